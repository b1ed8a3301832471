"""CPU references of the GPU kernels, one module per kernel family (named after kernels/<family>.cu):
layers, attention (attention_prefill + attention_decode), page_select, page_stats (the selector statistics
written by layers.cu's rope_write_kv_sparse), sampling. The CPU backend runs them (or their Numba
versions) and the kernel harness (lserve_lite/harness/) compares every kernel with them."""
