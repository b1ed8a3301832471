"""Head patterns: loading DuoAttention's TSV files, the global streaming-head ranking, bundled lookup."""

from __future__ import annotations

import re
import stat
from pathlib import Path

import numpy as np
import pytest

from lserve_lite.errors import InvalidRequestError, ModelLoadError
from lserve_lite.sparse.patterns import (
    PATTERNS_DIR,
    bundled_pattern,
    bundled_patterns,
    head_classes,
    load_pattern,
    num_streaming,
    resolve_pattern,
    save_pattern,
)

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "duo_patterns"
REAL = {
    "Llama-3-8B-Instruct-Gradient-1048k": (32, 8),
    "Meta-Llama-3.1-8B-Instruct": (32, 8),
    "Mistral-7B-Instruct-v0.2": (32, 8),
    "Llama-2-7B-32K-Instruct": (32, 32),
}


@pytest.mark.parametrize("name", sorted(REAL))
def test_real_patterns_load(name):
    path = bundled_pattern(name)
    assert path is not None and path.parent.name == name
    g = load_pattern(path, *REAL[name])
    assert g.shape == REAL[name] and g.dtype == np.float64
    assert np.all(np.isfinite(g)) and g.max() <= 1.01 and g.min() > -0.1
    if SHARED.is_dir():  # the shipped copy is the shared data, unchanged
        assert (SHARED / name / "full_attention_heads.tsv").read_bytes() == path.read_bytes()


def test_real_pattern_wrong_shape_names_file():
    path = bundled_pattern("Meta-Llama-3.1-8B-Instruct")
    with pytest.raises(ModelLoadError, match=r"full_attention_heads.tsv.*32 x 8.*needs 30 x 3"):
        load_pattern(path, 30, 3)
    with pytest.raises(ModelLoadError, match="32 x 32"):
        load_pattern(bundled_pattern("Llama-2-7B-32K-Instruct"), 32, 8)


def test_bad_files(tmp_path):
    missing = tmp_path / "nope.tsv"
    with pytest.raises(ModelLoadError, match="nope.tsv: head pattern file not found"):
        load_pattern(missing, 2, 2)
    bad = tmp_path / "bad.tsv"
    bad.write_text("0.1\t0.2\n0.3\tabc\n")
    with pytest.raises(ModelLoadError, match=r"bad.tsv:2: non-numeric gate value 'abc'"):
        load_pattern(bad, 2, 2)
    bad.write_text("0.1\t0.2\n0.3\n")
    with pytest.raises(ModelLoadError, match="bad.tsv: ragged"):
        load_pattern(bad, 2, 2)
    bad.write_text("0.1\tnan\n0.3\t0.4\n")
    with pytest.raises(ModelLoadError, match=r"bad.tsv:1: gate nan of layer 0, KV head 1 is not finite"):
        load_pattern(bad, 2, 2)
    bad.write_text("")
    with pytest.raises(ModelLoadError, match=r"0 x 0 .*needs 2 x 2"):
        load_pattern(bad, 2, 2)
    # a Windows editor's byte-order mark and line ends: still a pattern
    bad.write_bytes("\ufeff0.9\t0.1\r\n0.2\t0.8\r\n".encode())
    assert load_pattern(bad, 2, 2).tolist() == [[0.9, 0.1], [0.2, 0.8]]
    bad.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ModelLoadError, match="bad.tsv"):
        load_pattern(bad, 2, 2)
    for err in (ModelLoadError,):  # one line, no traceback needed
        try:
            load_pattern(missing, 1, 1)
        except err as e:
            assert "\n" not in str(e)


@pytest.mark.parametrize(
    "row2, entry",
    [
        ("0.3\t1.5", r"gate 1.5 of layer 1, KV head 1 is outside \[0, 1\]"),
        ("-0.2\t0.4", r"gate -0.2 of layer 1, KV head 0 is outside \[0, 1\]"),
        ("0.3\t90", r"gate 90.0 of layer 1, KV head 1 is outside \[0, 1\]"),  # a percentage
        ("inf\t0.4", r"gate inf of layer 1, KV head 0 is not finite"),
        ("0.3\t-1e999", r"gate -inf of layer 1, KV head 1 is not finite"),
        ("NaN\t0.4", r"gate nan of layer 1, KV head 0 is not finite"),
    ],
)
def test_gates_outside_0_1_are_refused_naming_the_entry(tmp_path, row2, entry):
    """Gates of another scale (a percentage, a raw score) or infinite ones were ranked without a word; only NaN was
    refused, naming no entry. DuoAttention's released gates dip just below 0 (bf16 noise): those load unchanged."""
    bad = tmp_path / "p.tsv"
    bad.write_text(f"# layer 0, then 1\n0.1\t0.2\n{row2}\n")
    with pytest.raises(ModelLoadError, match=r"p.tsv:3: " + entry) as e:
        load_pattern(bad, 2, 2)
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match=entry):  # what would be refused is not written either
        save_pattern(tmp_path / "q.tsv", load_pattern_unchecked(bad))
    assert not (tmp_path / "q.tsv").exists()
    bad.write_text("0.1\t-0.0014\n0.3\t1.0\n")
    assert load_pattern(bad, 2, 2).tolist() == [[0.1, -0.0014], [0.3, 1.0]]


def load_pattern_unchecked(path: Path) -> np.ndarray:
    """The numbers of a pattern file as they are (np.loadtxt), for a save that must refuse them."""
    return np.loadtxt(path, ndmin=2)


@pytest.mark.parametrize("sep", [" ", "\n"])
def test_a_huge_pattern_of_the_wrong_shape_is_refused_in_little_memory(tmp_path, sep):
    """Every field of the file became a string and a float before the shape was checked (1.8 GB for a 64 MB file
    at an engine's start); only rows the model can take are read."""
    import tracemalloc

    junk = ("0" + sep) * 1_000_000  # one row of a million gates, or a million rows of one
    bad = tmp_path / "big.tsv"
    bad.write_text(junk)
    tracemalloc.start()
    try:
        with pytest.raises(ModelLoadError, match=r"head pattern is (1 x 1000000|1000000 x 1) .*needs 30 x 3"):
            load_pattern(bad, 30, 3)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 * len(junk)  # the text (4 bytes a character at most) and its UTF-8 bytes, no more


def test_save_roundtrip_and_blank_lines(tmp_path):
    g = np.random.default_rng(0).random((5, 3))
    p = save_pattern(tmp_path / "x" / "p.tsv", g)
    np.testing.assert_array_equal(load_pattern(p, 5, 3), g)
    p.write_text("# comment\n" + p.read_text() + "\n\n")
    np.testing.assert_array_equal(load_pattern(p, 5, 3), g)


def test_save_that_fails_keeps_the_earlier_pattern(tmp_path, file_size_limit):
    """A write that fails part-way (a full disk, here a file-size limit) truncated the pattern an engine reads: the
    earlier pattern stays whole, and no temporary file is left beside it."""
    p = save_pattern(tmp_path / "p.tsv", np.full((2, 2), 0.5))
    before = p.read_bytes()
    with file_size_limit(len(before) // 2), pytest.raises(OSError):
        save_pattern(p, np.random.default_rng(0).random((8, 8)))
    assert p.read_bytes() == before and [f.name for f in tmp_path.iterdir()] == ["p.tsv"]


def test_save_through_a_link_writes_its_target(tmp_path):
    """The atomic write replaced a symbolic link with a regular file (a pattern linked into a model directory kept
    its old gates), and would have replaced a device such as /dev/null: the link's target is written."""
    real, link, null = tmp_path / "real.tsv", tmp_path / "link.tsv", tmp_path / "null.tsv"
    save_pattern(real, np.zeros((1, 2)))
    link.symlink_to(real)
    null.symlink_to("/dev/null")
    save_pattern(link, np.ones((1, 2)))
    save_pattern(null, np.ones((1, 2)))
    assert link.is_symlink() and null.is_symlink() and Path("/dev/null").is_char_device()
    assert load_pattern(real, 1, 2).tolist() == [[1.0, 1.0]] and null.read_text() == ""
    assert sorted(f.name for f in tmp_path.iterdir()) == ["link.tsv", "null.tsv", "real.tsv"]


def test_atomic_write_to_a_descriptor_appends_to_it(tmp_path):
    """`--json /dev/stdout`: a pipe resolves to `/proc/<pid>/fd/pipe:[N]`, beside which the temporary file could not
    be made (FileNotFoundError), and a file the shell redirected stdout to was replaced by the rename (the process's
    own output, written before and after, lost with it). A descriptor's file is appended to, as the shell's `>>`."""
    import os

    from lserve_lite.config import write_text_atomic

    r, w = os.pipe()
    log = tmp_path / "log.txt"
    try:
        write_text_atomic(Path(f"/dev/fd/{w}"), "to the pipe")
        assert os.read(r, 100) == b"to the pipe"
        with open(log, "w") as f:
            f.write("output so far\n")
            f.flush()
            write_text_atomic(Path(f"/proc/self/fd/{f.fileno()}"), "{}")
            assert os.fstat(f.fileno()).st_ino == log.stat().st_ino  # still the file stdout writes to
    finally:
        os.close(r)
        os.close(w)
    assert log.read_text() == "output so far\n{}" and [f.name for f in tmp_path.iterdir()] == ["log.txt"]


def test_atomic_write_to_stdout_comes_after_what_was_printed(tmp_path):
    """`--json /dev/stdout > log`: the text was appended while the process's own printed lines sat in its stdout
    buffer, which, flushed at exit at the redirection's offset 0, wrote over it."""
    import os
    import subprocess
    import sys

    code = "from pathlib import Path; from lserve_lite.config import write_text_atomic; print('a table line'); " \
           "write_text_atomic(Path('/dev/stdout'), '{}')"  # fmt: skip
    env = {
        k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"
    }  # a stdout block-buffered, as usual
    with open(tmp_path / "log", "w") as out:
        subprocess.run([sys.executable, "-c", code], stdout=out, env=env, check=True, timeout=60)
    assert (tmp_path / "log").read_text() == "a table line\n{}"


def test_save_keeps_the_files_permission_bits(tmp_path):
    """The atomic write's rename gave a file the user had made 0600 or 0640 the umask's bits (0644: readable by
    all): a file replaced keeps its mode; a new file gets the umask's as any other."""
    p = save_pattern(tmp_path / "p.tsv", np.zeros((1, 2)))
    for mode in (0o600, 0o640):
        p.chmod(mode)
        save_pattern(p, np.ones((1, 2)))
        assert stat.S_IMODE(p.stat().st_mode) == mode and load_pattern(p, 1, 2).tolist() == [[1.0, 1.0]]
    plain = tmp_path / "plain.tsv"
    plain.write_text("")
    assert save_pattern(tmp_path / "new.tsv", np.zeros((1, 2))).stat().st_mode == plain.stat().st_mode


def test_head_classes_count_and_global_ranking():
    g = np.array([[0.9, 0.8, 0.7], [0.1, 0.2, 0.3], [0.95, 0.05, 0.99]])
    cls = head_classes(g, 1 / 3)  # round(3) = 3 lowest: 0.05, 0.1, 0.2
    assert all(c.dtype == np.int32 and c.shape == (3,) for c in cls)
    np.testing.assert_array_equal(np.stack(cls), [[0, 0, 0], [1, 1, 0], [0, 1, 0]])
    # not per layer: layer 0 keeps all heads dense although its lowest gate is 0.7
    assert np.stack(head_classes(g, 0.0)).sum() == 0 and np.stack(head_classes(g, 1.0)).sum() == 9


@pytest.mark.parametrize("name", sorted(REAL))
def test_head_classes_on_real_patterns(name):
    g = load_pattern(bundled_pattern(name), *REAL[name])
    L, H = g.shape
    prev = np.zeros((L, H), np.int32)
    for s in np.linspace(0, 1, 21):
        c = np.stack(head_classes(g, s))
        assert c.sum() == round(s * L * H) == num_streaming(s, L, H)
        assert np.all(c >= prev)  # monotone: a streaming head stays streaming as s grows
        if 0 < c.sum() < c.size:  # every streaming gate <= every dense gate
            assert g[c == 1].max() <= g[c == 0].min()
        prev = c
    c = np.stack(head_classes(g, 0.5))
    per_layer = c.sum(axis=1)
    assert per_layer.min() != per_layer.max()  # real patterns: the split differs by layer (global ranking)


def test_head_classes_ties_deterministic():
    g = np.zeros((4, 2))
    c = np.stack(head_classes(g, 0.5))
    np.testing.assert_array_equal(c.reshape(-1), [1, 1, 1, 1, 0, 0, 0, 0])  # row-major order wins ties
    np.testing.assert_array_equal(np.stack(head_classes(g.copy(), 0.5)), c)
    with pytest.raises(ValueError):
        head_classes(g, 1.5)


def test_bundled_lookup(tmp_path):
    assert set(REAL) <= set(bundled_patterns())
    assert bundled_pattern("/models/meta-llama--Meta-Llama-3.1-8B-Instruct").parent.name == (
        "Meta-Llama-3.1-8B-Instruct"
    )
    assert bundled_pattern("meta-llama/Llama-3.1-8B-Instruct").parent.name == "Meta-Llama-3.1-8B-Instruct"
    assert bundled_pattern("mistral-7b-instruct-v0.2-q4").parent.name == "Mistral-7B-Instruct-v0.2"
    assert bundled_pattern("gpt2") is None
    # another version of a shipped model has no pattern (v0.3 got v0.2's through the alias's prefix)
    assert (
        bundled_pattern("Mistral-7B-Instruct-v0.3") is None
        and bundled_pattern("mistral-7b-instruct-v0.1") is None
    )
    assert bundled_pattern("Llama-3.1-8B-Instruct-Q4_K_M.gguf").parent.name == "Meta-Llama-3.1-8B-Instruct"
    assert bundled_pattern(tmp_path / "Qwen2-0.5B") is None
    # a pattern inside the model directory wins; config.json's _name_or_path is consulted
    d = tmp_path / "my-model"
    d.mkdir()
    (d / "config.json").write_text('{"_name_or_path": "org/Mistral-7B-Instruct-v0.2"}')
    assert bundled_pattern(d).parent.name == "Mistral-7B-Instruct-v0.2"
    # `lserve-lite convert`'s output finds its GGUF's pattern (it ran without one: --sparse asked for a calibration)
    conv = tmp_path / "out"
    conv.mkdir()
    (conv / "config.json").write_text(
        '{"lserve_lite": {"converted_from": "smollm2-135m-instruct.q4_1.gguf"}}'
    )
    assert bundled_pattern(conv).parent.name == "SmolLM2-135M-Instruct"
    save_pattern(d / "full_attention_heads.tsv", np.ones((2, 2)))
    assert bundled_pattern(d) == d / "full_attention_heads.tsv"
    with pytest.raises(ModelLoadError, match="lserve-lite calibrate"):
        resolve_pattern(tmp_path / "other", 2, 2)
    assert resolve_pattern(d, 2, 2).shape == (2, 2)


def test_bundled_lookup_of_a_relative_model_path(tmp_path, monkeypatch):
    """`lserve-lite serve --model . --sparse`, run inside a model directory named as a shipped pattern (its
    config.json without `_name_or_path`), found no pattern: the name looked up was ".". `..` as well."""
    d = tmp_path / "SmolLM2-135M-Instruct"
    (d / "sub").mkdir(parents=True)
    (d / "config.json").write_text("{}")
    monkeypatch.chdir(d)
    assert bundled_pattern(".").parent.name == bundled_pattern("./").parent.name == "SmolLM2-135M-Instruct"
    monkeypatch.chdir(d / "sub")
    assert bundled_pattern("..").parent.name == "SmolLM2-135M-Instruct"


def test_smollm2_pattern_shipped():
    p = PATTERNS_DIR / "SmolLM2-135M-Instruct" / "full_attention_heads.tsv"
    if not p.exists():
        pytest.skip("calibrated SmolLM2 pattern not produced yet")
    g = load_pattern(p, 30, 3)
    assert g.min() >= 0 and g.max() == pytest.approx(1.0)
    assert bundled_pattern("HuggingFaceTB/SmolLM2-135M-Instruct") == p


# -- calibration and the runner-level harness (tiny random model) ------------------------------------------


def _np_tiny(
    path: Path, layers: int = 2, hidden: int = 64, heads: int = 4, kv: int = 2, vocab: int = 320
) -> Path:
    """A random tiny Llama written with NumPy (no torch): config, safetensors, tokenizer."""
    import json

    from safetensors.numpy import save_file
    from tiny_models import write_tokenizer

    rng = np.random.default_rng(0)
    d, inter = hidden // heads, 96
    w = {
        "model.embed_tokens.weight": (vocab, hidden),
        "model.norm.weight": None,
        "lm_head.weight": (vocab, hidden),
    }
    for i in range(layers):
        p = f"model.layers.{i}."
        w |= {p + "self_attn.q_proj.weight": (heads * d, hidden), p + "self_attn.k_proj.weight": (kv * d, hidden),
              p + "self_attn.v_proj.weight": (kv * d, hidden), p + "self_attn.o_proj.weight": (hidden, heads * d),
              p + "mlp.gate_proj.weight": (inter, hidden), p + "mlp.up_proj.weight": (inter, hidden),
              p + "mlp.down_proj.weight": (hidden, inter), p + "input_layernorm.weight": None,
              p + "post_attention_layernorm.weight": None}  # fmt: skip
    tensors = {
        k: (
            np.ones(hidden, np.float32)
            if shape is None
            else (rng.standard_normal(shape) * 0.08).astype(np.float32)
        )
        for k, shape in w.items()
    }
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "hidden_size": hidden, "intermediate_size": inter,
        "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv,
        "vocab_size": vocab, "max_position_embeddings": 1024, "rope_theta": 10000.0,
        "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "eos_token_id": 2, "bos_token_id": 1,
        "torch_dtype": "float32",
    }))  # fmt: skip
    write_tokenizer(path, vocab)
    return path


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return _np_tiny(tmp_path_factory.mktemp("np_tiny"))


@pytest.fixture(scope="module")
def tiny_llm(tiny_dir):
    from lserve_lite import LLM, EngineConfig

    return LLM(str(tiny_dir), backend="cpu", config=EngineConfig(num_kv_pages=40, max_num_batched_tokens=128))


def test_passkey_sample_layout(tiny_llm):
    from lserve_lite.evaluation.synthetic import corpus_text, passkey_sample

    tok = tiny_llm.tokenizer
    for filler in ("classic", "corpus"):
        s = passkey_sample(tok, 400, 0.5, "12345", filler, offset=1000)
        assert abs(s.num_tokens - 400) <= 40 and s.answer_ids == tok.encode(" 12345.", False)
        assert tok.decode(s.prompt_ids[s.needle_pos :]).lstrip().startswith("The pass key is 12345.")
        assert 0.3 < s.needle_pos / s.num_tokens < 0.7
    assert len(corpus_text()) > 60_000 and corpus_text(1000) == corpus_text()[: len(corpus_text(1000))]


def test_harness_prefix_reuse_is_exact(tiny_llm):
    from lserve_lite.evaluation.harness import SparseHarness

    h = SparseHarness(tiny_llm)
    ids = [int(t) for t in np.random.default_rng(0).integers(3, 300, 300)]
    ref = tiny_llm.logits(ids)
    seq = h.begin(ids, prompt_len=260)
    try:
        h.set_heads(h.dense_classes(), 0, 0)
        np.testing.assert_allclose(h.forward(seq, 300), ref, rtol=1e-5, atol=1e-5)
        cls = h.dense_classes()
        cls[1][0] = 1
        h.set_heads(cls, 64, 64)  # a streaming head changes the tail ...
        h.rewind(seq, 260)
        changed = h.forward(seq, 40)
        assert np.abs(changed - ref[260:]).max() > 1e-4
        h.set_heads(h.dense_classes(), 0, 0)  # ... and re-running it dense restores the dense logits
        h.rewind(seq, 260)
        np.testing.assert_allclose(h.decode(seq, 40), ref[260:], rtol=1e-4, atol=1e-4)
    finally:
        h.end(seq)


def test_harness_forward_refuses_tokens_it_does_not_have(tiny_llm):
    """forward() past the sequence's tokens failed inside the model with a reshape error; a negative count ran
    nothing and returned no logits. Both are a one-line error before anything runs."""
    from lserve_lite.evaluation.harness import SparseHarness

    h = SparseHarness(tiny_llm)
    seq = h.begin(list(range(3, 50)), prompt_len=40)
    try:
        for n in (48, 200, -3):
            with pytest.raises(InvalidRequestError, match="computes 0 to 47 more tokens here"):
                h.forward(seq, n)
        assert seq.num_cached == 0 and h.forward(seq, 47).shape == (47, 320)
    finally:
        h.end(seq)


def test_harness_refuses_bad_arguments_before_anything_runs(tiny_llm):
    """Token ids outside the vocabulary ran (a wrapped or clipped embedding row), a negative reserve failed
    with an IndexError mid-forward, a fractional count with a TypeError, and a rewind past the tokens computed
    silently read K/V never written. Each is a one-line error, and begin() takes no page or slot for it."""
    from lserve_lite.evaluation.harness import SparseHarness

    h, blocks = SparseHarness(tiny_llm), tiny_llm.engine.blocks
    ids = list(range(3, 50))
    for bad, match in (
        (dict(ids=[5, 320]), "sequence token ids must be in \\[0, 320\\)"),
        (dict(ids=[-1, 5]), "sequence token ids must be in"),
        (dict(ids=[]), "sequence is empty"),
        (dict(ids=ids, prompt_len=0), "prompt_len must be an integer in \\[1, 47\\]"),
        (dict(ids=ids, prompt_len=48), "prompt_len must be an integer in \\[1, 47\\]"),
        (dict(ids=ids, reserve=-40), "reserve must be an integer in \\[0, "),
        (dict(ids=ids, reserve=2.5), "reserve must be an integer"),
    ):
        with pytest.raises(InvalidRequestError, match=match):
            h.begin(**bad)
        assert blocks.num_used == 0
    seq = h.begin(ids, prompt_len=np.int64(40))
    try:
        with pytest.raises(InvalidRequestError, match="computes 0 to 47 more tokens here, got 2.5"):
            h.forward(seq, 2.5)
        h.forward(seq, 40, logits="last")
        for n in (41, -1, 1.0):
            with pytest.raises(InvalidRequestError, match="rewind to 0 to 40 tokens"):
                h.rewind(seq, n)
        with pytest.raises(InvalidRequestError, match="decode\\(\\) needs"):
            h.decode(seq, 2.5)
        assert h.decode(seq, 0).shape == (0, 320)  # np.concatenate of nothing raised
        assert seq.num_cached == 40 and h.decode(seq, 7).shape == (7, 320)
    finally:
        h.end(seq)


def test_harness_set_heads_refuses_bad_classes_and_windows_before_any_step(tiny_llm):
    """set_heads (the runner's set_head_classes hook) took anything: a KV head too many failed mid-forward (a reshape),
    a layer too few with an IndexError, a layer too many and a class 2 ran silently, a class -1 or a window of no
    token made NaN logits, a fractional sink a TypeError mid-run. Each is one line, and the heads stay as they were."""
    from lserve_lite.evaluation.harness import SparseHarness

    h, one = SparseHarness(tiny_llm), [np.array([1, 0])] * 2
    shape = r"head classes must be 2 layers of 2 KV heads, each 0 \(dense\) or 1 \(streaming\)"
    for classes, sink, local, match in (
        ([np.array([1, 0, 1])] * 2, 64, 64, shape),
        ([np.array([1, 0])], 64, 64, shape),
        ([np.array([1, 0])] * 3, 64, 64, shape),
        ([np.array([2, 0])] * 2, 64, 64, shape),
        ([np.array([-1, 0])] * 2, 64, 64, shape),
        ([np.array([0.5, 0])] * 2, 64, 64, shape),
        (None, 64, 64, shape),
        (one, -64, 64, r"sink must be an integer in \[0, 16777216\], got -64"),
        (one, 64.5, 64, r"sink must be an integer in \[0, 16777216\], got 64.5"),
        (one, 64, 0, r"local must be an integer in \[1, 16777216\], got 0"),
        (one, 64, 10**12, r"local must be an integer in \[1, 16777216\], got 1000000000000"),
    ):
        with pytest.raises(InvalidRequestError, match=match):
            h.set_heads(classes, sink, local)
        assert [c.tolist() for c in h.runner.head_classes] == [[0, 0], [0, 0]] and h.runner.local == 0
    h.set_heads(np.zeros((2, 2), np.int32), 0, 0)  # no streaming head: no window needed
    h.set_heads(
        [np.array([True, False])] * 2, np.int64(64), 64
    )  # booleans and NumPy's integers are classes too
    try:
        assert [c.tolist() for c in h.runner.head_classes] == [[1, 0], [1, 0]] and h.runner.sink == 64
    finally:
        h.set_heads(h.dense_classes(), 0, 0)


def test_harness_of_a_closed_llm_runs_nothing_and_holds_nothing(tiny_dir):
    """LLM.close frees the model runner (weights, KV cache) now and no step runs after; a SparseHarness kept its
    own reference to the runner: its forward() ran on the closed LLM, and the runner stayed in memory."""
    import gc
    import weakref

    from lserve_lite import LLM, EngineConfig
    from lserve_lite.errors import LServeError
    from lserve_lite.evaluation.harness import SparseHarness

    llm = LLM(str(tiny_dir), backend="cpu", config=EngineConfig(num_kv_pages=8))
    h = SparseHarness(llm)
    seq = h.begin(list(range(3, 50)))
    ref = weakref.ref(llm.engine.runner)
    llm.close()
    gc.collect()
    assert ref() is None
    with pytest.raises(LServeError, match="^this LLM was closed"):
        h.forward(seq, 10)


def test_harness_steps_and_another_threads_generate_take_turns(tiny_dir, monkeypatch):
    """The harness ran the engine's runner and took its pages without the LLM's turn: an application's generate in
    another thread stepped the engine in the middle of a harness forward (two runs on one executor and KV cache,
    the block manager changed from two threads). Each harness call holds the turn (LLM.hold_engine): generate waits
    for it, then answers as it does alone."""
    import threading

    from lserve_lite import LLM, EngineConfig, SamplingParams
    from lserve_lite.evaluation.harness import SparseHarness

    llm = LLM(str(tiny_dir), backend="cpu", config=EngineConfig(num_kv_pages=40))
    h, params = SparseHarness(llm), SamplingParams(max_new_tokens=4, temperature=0, ignore_eos=True)
    want = llm.generate([[5, 6, 7]], params)[0].token_ids
    waited, decided, got = threading.Event(), threading.Event(), []

    class Turns:
        """The LLM's lock, telling whether the generate thread found it taken (and waited) or free."""

        def __init__(self, lock):
            self.lock = lock

        def acquire(self, blocking: bool = True) -> bool:
            if threading.current_thread() is not threading.main_thread() and not decided.is_set():
                if not self.lock.acquire(blocking=False):
                    waited.set()
                    decided.set()
                    return self.lock.acquire(blocking)
                decided.set()
                return True
            return self.lock.acquire(blocking)

        def release(self) -> None:
            self.lock.release()

        def _is_owned(self) -> bool:
            return self.lock._is_owned()

        __enter__ = acquire

        def __exit__(self, *exc: object) -> None:
            self.release()

    run, other = (
        llm.engine.runner.run,
        threading.Thread(target=lambda: got.append(llm.generate([[5, 6, 7]], params))),
    )

    def run_while_generate_starts(*args, **kw):
        if threading.current_thread() is threading.main_thread() and other.ident is None:  # once
            other.start()
            assert decided.wait(60)
            if not waited.is_set():  # it stepped the engine meanwhile: let it end before going on
                other.join()
        return run(*args, **kw)

    monkeypatch.setattr(llm, "_lock", Turns(llm._lock))
    monkeypatch.setattr(llm.engine.runner, "run", run_while_generate_starts)
    seq = h.begin(list(range(3, 40)))
    h.forward(seq, 10)
    h.end(seq)
    other.join()
    assert waited.is_set()
    assert got[0][0].token_ids == want and llm.engine.blocks.num_used == 0


def test_harness_greedy_refuses_more_tokens_than_its_pages_hold(tiny_llm):
    """greedy() past the pages begin() reserved failed with an IndexError in the planner after its first steps;
    it is refused in one line before any step (47 prompt tokens in one 64-token page: 18 tokens fit)."""
    from lserve_lite.evaluation.harness import SparseHarness

    h = SparseHarness(tiny_llm)
    seq = h.begin(list(range(3, 50)), reserve=2)
    try:
        first = h.forward(seq, 47, logits="last")[-1]
        with pytest.raises(InvalidRequestError, match="greedy\\(\\) makes at most 18 tokens here"):
            h.greedy(seq, 19, first)
        assert seq.num_cached == 47 and len(h.greedy(seq, 18, first)) == 18
    finally:
        h.end(seq)


def test_engine_selection(tiny_dir, tiny_llm):
    """The engine's page selector (all heads dense, LServe mode), run through the harness: budget >= context
    gives the dense decode; a small budget changes it; the key statistics equal a from-scratch computation;
    one selecting attention call equals a brute-force softmax over the pages the rule picks."""
    from lserve_lite import LLM, EngineConfig, SparseConfig
    from lserve_lite.backends.reference.page_stats import page_stats_reference
    from lserve_lite.evaluation.harness import SparseHarness
    from lserve_lite.sparse.plan import BatchLayout, build_plan
    from lserve_lite.sparse.selector import choose_pages

    ids = [int(t) for t in np.random.default_rng(1).integers(3, 300, 700)]
    dense_h = SparseHarness(tiny_llm)
    seq = dense_h.begin(ids, prompt_len=680)
    try:
        dense_h.forward(seq, 680, logits="last")
        dense = dense_h.decode(seq, 8)
    finally:
        dense_h.end(seq)
    sc = SparseConfig(enabled=True, static_sparsity=0.0, token_budget=768, select_interval=4)
    llm = LLM(
        str(tiny_dir),
        backend="cpu",
        config=EngineConfig(num_kv_pages=40, max_num_batched_tokens=128, sparse=sc),
    )
    h = SparseHarness(llm)
    seq = h.begin(ids, prompt_len=680)
    try:
        h.forward(seq, 680, logits="last")
        np.testing.assert_allclose(h.decode(seq, 8), dense, rtol=1e-5, atol=1e-5)
        h.set_request_sparse(seq, sc.with_updates(token_budget=128))
        h.rewind(seq, 680)
        assert np.abs(h.decode(seq, 3) - dense[:3]).max() > 1e-4

        cache, cfg, ops = h.runner.cache, h.cfg, h.runner.ops
        ref_max, ref_min = page_stats_reference(cache.k[1], seq.page_table, seq.num_cached, 4)
        np.testing.assert_array_equal(cache.kmax[1][seq.page_table[:10]], ref_max[:10])
        np.testing.assert_array_equal(cache.kmin[1][seq.page_table[:10]], ref_min[:10])

        layer, ctx = 1, 683
        q = np.random.default_rng(2).standard_normal((1, cfg.num_heads, cfg.head_dim)).astype(np.float32)
        lay = BatchLayout(
            [1], [ctx], [seq.page_table], sel_slots=[seq.sel_slot], sel_keep=[2], sel_refresh=[1]
        )
        plan = build_plan(lay, 64)
        ops.select_pages(q, cache, layer, plan)
        out = ops.attention(q, cache, layer, plan, cache.head_class[layer]).reshape(cfg.num_heads, -1)
        lpages = choose_pages(
            q[0], cache.kmax[layer], cache.kmin[layer], seq.page_table, ctx, cfg.group_size, 2, 64
        )
        pages = np.asarray(seq.page_table)[lpages]
        kc, vc = cache.k[layer], cache.v[layer]
        for head in range(cfg.num_heads):
            kvh = head // cfg.group_size
            pos = (lpages[kvh][:, None] * 64 + np.arange(64)).reshape(-1)
            k = kc[pages[kvh]][:, kvh].reshape(-1, cfg.head_dim)
            v = vc[pages[kvh]][:, kvh].reshape(-1, cfg.head_dim)
            s = (k @ q[0, head]) / np.sqrt(cfg.head_dim)
            s = np.where(pos < ctx, s, -np.inf)
            p = np.exp(s - s.max())
            np.testing.assert_allclose(out[head], (p / p.sum()) @ v, rtol=1e-4, atol=1e-5)
    finally:
        h.end(seq)


def test_calibrate_tiny(tiny_dir, tmp_path):
    from lserve_lite.evaluation.calibrate import calibrate

    out = tmp_path / "pat.tsv"
    res = calibrate(
        tiny_dir, out, num_samples=2, lengths=[384], sink=64, local=64, tail=8, log=lambda s: None
    )
    g = load_pattern(out, 2, 2)
    np.testing.assert_allclose(g, res.gates)
    assert g.min() >= 0 and g.max() == pytest.approx(1.0)
    import json

    meta = json.loads(out.with_suffix(".json").read_text())
    assert set(meta["validation"]) == {"calibrated", "random", "inverted"} and len(meta["samples"]) == 2
    assert meta["model"] == tiny_dir.name  # the model's name, not this machine's path to it
    # the same seed gives the same pattern, byte for byte; a name with a dot keeps it in its details' name (`pat.v2`
    # wrote pat.json, the details of pat.tsv)
    res2 = calibrate(
        tiny_dir, tmp_path / "pat.v2", num_samples=2, lengths=[384], sink=64, local=64, tail=8, validate=False,
        log=lambda s: None,
    )  # fmt: skip
    assert (tmp_path / "pat.v2").read_bytes() == out.read_bytes() and np.array_equal(res2.kl, res.kl)
    assert json.loads(out.with_suffix(".json").read_text()) == meta
    assert "validation" not in json.loads((tmp_path / "pat.v2.json").read_text())


def test_calibrate_refuses_scores_that_are_not_finite(tiny_dir, tmp_path, monkeypatch):
    """Logits that overflow (NaN) made a head's score NaN, which compared false with the best score: every gate became
    1 and a pattern of ties (the first heads streaming) was written after the whole run, without a word."""
    from lserve_lite.errors import LServeError
    from lserve_lite.evaluation import calibrate as cal

    calls, log_softmax = [], cal._log_softmax

    def nan_for_one_head(x: np.ndarray) -> np.ndarray:
        calls.append(1)  # the dense reference, then heads (0, 0), (0, 1), ...: (0, 1)'s logits overflow
        return log_softmax(x) * (np.nan if len(calls) == 3 else 1.0)

    monkeypatch.setattr(cal, "_log_softmax", nan_for_one_head)
    out = tmp_path / "pat.tsv"
    with pytest.raises(
        LServeError, match=r"scored 1 head\(s\) as nan \(first: layer 0, KV head 1\).*no pattern"
    ):
        cal.calibrate(tiny_dir, out, num_samples=1, lengths=[384], sink=64, local=64, tail=8, validate=False,
                      log=lambda s: None)  # fmt: skip
    assert not out.exists()


def test_calibrate_refuses_an_unusable_output_first(tiny_dir, tmp_path):
    """The output is checked before the model loads (a run takes hours): a directory or an unwritable place,
    and a .json name, whose details JSON would overwrite the pattern written to the same path."""
    from lserve_lite.evaluation.calibrate import calibrate

    (tmp_path / "file").write_text("x")
    (tmp_path / "d.json").mkdir()  # where d.tsv's details go: the run ended in an IsADirectoryError traceback
    for out, msg in ((tmp_path, "is a directory"), (tmp_path / "p.json", "the pattern is a TSV"),
                     (tmp_path / "file" / "p.tsv", "cannot write there"),
                     (tmp_path / "d.tsv", "d.json is a directory; the pattern's details go there")):  # fmt: skip
        with pytest.raises(InvalidRequestError, match=msg):
            calibrate(tiny_dir, out, num_samples=1, lengths=[384], sink=64, local=64, tail=8, log=print)


@pytest.mark.parametrize(
    "bad, msg",
    [
        (dict(num_samples=0), r"num_samples must be an integer in \[1, 100000\], got 0"),  # was: num_kv_pages
        (dict(num_samples=1.5), "num_samples must be an integer"),  # was a TypeError in a slice
        (dict(sink=-3), r"sink must be an integer in \[0, "),  # wrote a pattern
        (dict(local=0), r"local must be an integer in \[1, "),  # wrote gates of all ones
        (dict(tail=0), r"tail must be an integer in \[2, 4096\]"),  # failed after the first prefill
        (dict(lengths=[384.5]), "each of lengths must be an integer in"),
        (dict(seed=-1), "seed must be an integer"),
    ],
)
def test_calibrate_refuses_settings_the_command_line_refuses(tiny_dir, tmp_path, monkeypatch, bad, msg):
    """calibrate() from Python takes the settings `lserve-lite calibrate` bounds, refused in one line before the
    model loads and nothing written."""
    from lserve_lite.evaluation import calibrate as cal

    monkeypatch.setattr(cal, "LLM", lambda *a, **k: pytest.fail("the model loaded"))
    kw = dict(num_samples=1, lengths=[384], sink=64, local=64, tail=8, log=print) | bad
    with pytest.raises(InvalidRequestError, match=f"^{msg}"):
        cal.calibrate(tiny_dir, tmp_path / "p.tsv", **kw)
    assert list(tmp_path.iterdir()) == []


def test_calibrate_length_near_the_context_names_the_limit(tiny_dir, tmp_path):
    """A length just under the context (1010 of 1024) was refused as 'exceeds the model's context 1024': the
    refusal counts the answer's tokens in, as the eval tools' refusals do (one home: settings.refuse_past_context),
    and names the flag that runs past the context."""
    from lserve_lite.evaluation.calibrate import calibrate

    msg = (
        r"^sample length 1010 \+ 16 tokens of answer exceeds the model's context 1024 \(--max-model-len runs past "
        r"it\)$"
    )
    with pytest.raises(InvalidRequestError, match=msg):
        calibrate(tiny_dir, tmp_path / "p.tsv", num_samples=1, lengths=[1010], log=print)


def test_calibrate_too_short_samples_name_every_term():
    """512 tokens hold sink 128 + local 256, but not with a 600-token tail: the refusal counts the tail (it
    said 'too short for sink 128 + local 256', untrue of 512 tokens)."""
    from lserve_lite.evaluation.calibrate import make_samples

    msg = "samples of 512 tokens are too short: .* more than sink 128 + local 256 + tail 600 + 96 = 1080$"
    with pytest.raises(InvalidRequestError, match=msg.replace("+", r"\+")):
        make_samples(None, [512], 1, sink=128, local=256, tail=600, seed=0)


def test_calibrate_builds_each_sample_when_its_turn_comes(tiny_dir, monkeypatch):
    """Every calibration sample was built before the first one ran, all held at once (100k samples at long
    context): each is built when asked for, the same samples as all at once."""
    from lserve_lite.evaluation import calibrate
    from lserve_lite.tokenizer import Tokenizer

    tok, built, make = Tokenizer(tiny_dir), [0], calibrate.passkey_sample

    def counting(*a, **kw):
        built[0] += 1
        return make(*a, **kw)

    monkeypatch.setattr(calibrate, "passkey_sample", counting)
    args = (tok, [600, 900], 3, 64, 128, 24, 5)
    lazy = calibrate.make_samples(*args)
    assert built[0] == 0
    first = next(lazy)
    assert built[0] == 1
    rest = list(lazy)
    again = list(calibrate.make_samples(*args))
    assert [s.prompt_ids for s in [first, *rest]] == [s.prompt_ids for s in again]
    assert len(again) == 3 and len(again[0].prompt_ids) < len(again[1].prompt_ids)  # lengths cycle


def test_calibrate_validation_line_signs_the_nll_change():
    """A sparse run whose answer NLL is lower than dense's was logged as 'answer NLL +-1.030'."""
    from types import SimpleNamespace

    from lserve_lite.evaluation.calibrate import _validate

    ref = np.log(np.full((1, 4), 0.25))
    better = np.log(np.array([[0.7, 0.1, 0.1, 0.1]]))
    kept = [(None, SimpleNamespace(answer_ids=[0]), lambda cls, sink, local: better, ref, -ref[0, 0])]
    lines: list[str] = []
    _validate(kept, np.zeros((1, 2)), 4, 4, 0, lines.append)
    assert len(lines) == 3 and all(f"answer NLL {np.log(0.25) - np.log(0.7):+.3f}," in ln for ln in lines)
    assert all("answer NLL -1.030," in ln and "+-" not in ln for ln in lines)


def test_calibrate_bounds_samples_by_name(tiny_dir, tmp_path):
    """Validation keeps every sample's KV at once: a sample count whose pages no pool holds is refused before
    the model loads, naming --samples and how many fit (it was refused as an out-of-range num_kv_pages)."""
    from lserve_lite.evaluation.calibrate import calibrate

    msg = r"^--samples 100000: .* 1050000 pages .* use at most 99864 samples, or --no-validate$"
    with pytest.raises(InvalidRequestError, match=msg):
        calibrate(tiny_dir, tmp_path / "p.tsv", num_samples=100_000, lengths=[384, 700], log=print)
    from lserve_lite.config import MAX_POOL_PAGES
    from lserve_lite.evaluation.calibrate import _sample_pages

    assert _sample_pages([384, 700], 99864, 64) <= MAX_POOL_PAGES < _sample_pages([384, 700], 99865, 64)


def test_calibrate_bounds_samples_by_memory(tiny_dir, tmp_path, monkeypatch):
    """Sample counts whose KV pages one pool could hold but the device's memory cannot were refused as
    'num_kv_pages=N needs X GiB', an option the user never set: the error names --samples and how many fit (or,
    without validation, --lengths)."""
    from lserve_lite.backends.cpu import CpuOps
    from lserve_lite.evaluation.calibrate import _sample_pages, calibrate

    monkeypatch.setattr(CpuOps, "kv_limit_bytes", lambda self, reserved=0: 8 << 20)  # 8 MiB of KV memory
    kw = dict(lengths=[384, 700], sink=64, local=64, tail=8, log=print)
    msg = r"^--samples 1000: .* this device's KV memory holds \((\d+)\); use at most (\d+) samples, or --no-validate$"
    with pytest.raises(InvalidRequestError, match=msg) as e:
        calibrate(tiny_dir, tmp_path / "p.tsv", num_samples=1000, **kw)
    fits, fit = map(int, re.match(msg, str(e.value)).groups())
    assert 0 < fit < 1000 and _sample_pages(kw["lengths"], fit, 64) <= fits < _sample_pages(
        kw["lengths"], fit + 1, 64
    )
    monkeypatch.setattr(CpuOps, "kv_limit_bytes", lambda self, reserved=0: 1 << 10)
    with pytest.raises(
        InvalidRequestError, match=r"^--lengths: a sample of 700 tokens takes 13 KV pages .* holds \(0\)"
    ):
        calibrate(tiny_dir, tmp_path / "p.tsv", num_samples=1000, validate=False, **kw)


def test_engine_sparse_mode_matches_dense_pool_streaming(tiny_dir, tiny_llm, tmp_path):
    """The engine's LServe mode (two pools, ring, per-phase windows; a budget that covers the context) against
    the same streaming heads made in the dense pool through the runner's `set_head_classes` hook: same
    teacher-forced decode logits."""
    from lserve_lite import LLM, EngineConfig, SparseConfig
    from lserve_lite.evaluation.harness import SparseHarness

    gates = np.random.default_rng(5).random((2, 2))
    pat = save_pattern(tmp_path / "p.tsv", gates)
    sc = SparseConfig(enabled=True, static_sparsity=0.5, token_budget=1024, select_interval=1, prefill_sink=64,
                      prefill_local=128, decode_sink=64, decode_local=64, pattern_path=str(pat))  # fmt: skip
    ids = [int(t) for t in np.random.default_rng(6).integers(3, 300, 520)]
    P = 500
    eng = SparseHarness(LLM(str(tiny_dir), backend="cpu", config=EngineConfig(num_kv_pages=40, sparse=sc)))
    seq = eng.begin(ids, prompt_len=P)
    eng.forward(seq, P, logits="last")
    got = eng.decode(seq, 20)
    eng.end(seq)

    emu = SparseHarness(tiny_llm)
    cls = head_classes(gates, 0.5)
    seq = emu.begin(ids, prompt_len=P)
    try:
        emu.set_heads(cls, 64, 128)
        emu.forward(seq, P, logits="last")
        emu.set_heads(cls, 64, 64)
        want = emu.decode(seq, 20)
    finally:
        emu.set_heads(emu.dense_classes(), 0, 0)
        emu.end(seq)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_engine_takes_a_pathlib_pattern(tiny_dir, tmp_path):
    """SparseConfig(pattern_path=Path(...)) was refused ("must be NoneType"): a path is a str or a PathLike."""
    from lserve_lite import LLM, EngineConfig, SparseConfig

    pat = save_pattern(tmp_path / "p.tsv", np.array([[0.9, 0.1], [0.2, 0.8]]))
    sc = SparseConfig(enabled=True, page_size=16, prefill_local=128, decode_local=64, pattern_path=pat)
    llm = LLM(str(tiny_dir), backend="cpu", config=EngineConfig(page_size=16, num_kv_pages=8, sparse=sc))
    assert [c.tolist() for c in llm.engine.layout.head_class] == [[0, 1], [1, 0]]
    with pytest.raises(
        InvalidRequestError, match=r"pattern_path must be a path \(str or os.PathLike\) or None, got 3"
    ):
        SparseConfig(pattern_path=3).validate()


@pytest.mark.parametrize(
    "text, msg",
    [
        ("0.5\t0.1\n", r"p.tsv: head pattern is 1 x 2 .*needs 2 x 2"),
        ("0.5\t0.1\n0.2\t7\n", r"p.tsv:2: gate 7.0 "),
    ],
)
def test_bad_pattern_refused_before_the_weights_load(tiny_dir, tmp_path, monkeypatch, text, msg):
    """A pattern of the wrong shape was found only after the weights had loaded (a bf16 or --quantize'd 8B model:
    minutes and tens of GB, then a one-line error): the layout is checked from the config first."""
    from lserve_lite import LLM, EngineConfig, SparseConfig
    from lserve_lite.engine import startup

    def load_model(*args):
        raise AssertionError("the weights loaded before the head pattern was checked")

    monkeypatch.setattr(startup, "load_model", load_model)
    bad = tmp_path / "p.tsv"
    bad.write_text(text)
    sc = SparseConfig(enabled=True, pattern_path=str(bad))
    with pytest.raises(ModelLoadError, match=msg):
        LLM(str(tiny_dir), backend="cpu", config=EngineConfig(quantize="int8", sparse=sc))


def test_pattern_given_to_a_dense_engine_is_refused(tmp_path):
    """A pattern given without enabled=True was never read: the engine ran dense and said nothing, while the user
    believed LServe ran with that pattern (the command line refuses --pattern without --sparse)."""
    from lserve_lite import EngineConfig, SparseConfig

    (tmp_path / "p.tsv").write_text("0.9\t0.1\n0.2\t0.8\n")
    for sparse in (SparseConfig(pattern_path=tmp_path / "p.tsv"), {"pattern_path": str(tmp_path / "p.tsv")}):
        with pytest.raises(
            InvalidRequestError, match=r"pattern_path applies to LServe .*: set enabled=True or drop it"
        ):
            EngineConfig(sparse=sparse)
    assert EngineConfig(sparse=SparseConfig(enabled=True, pattern_path=tmp_path / "p.tsv")).sparse.enabled


def test_pattern_given_is_checked_without_streaming_heads(tiny_dir, tmp_path):
    """With static_sparsity 0 a pattern path was never read: a missing or wrong file was accepted without a word."""
    from lserve_lite import LLM, EngineConfig, SparseConfig

    for path, msg in (
        (tmp_path / "typo.tsv", "head pattern file not found"),
        (tmp_path / "p.tsv", "is 1 x 1"),
    ):
        if path.name == "p.tsv":
            path.write_text("0.5\n")
        sc = SparseConfig(enabled=True, static_sparsity=0.0, pattern_path=str(path))
        with pytest.raises(ModelLoadError, match=msg):
            LLM(str(tiny_dir), backend="cpu", config=EngineConfig(num_kv_pages=8, sparse=sc))


@pytest.mark.parametrize("kind", ["fifo", "device"])
def test_pattern_that_is_not_a_regular_file_is_refused(tmp_path, kind):
    """A FIFO hung the load and /dev/zero grew memory without end: one line instead."""
    import os

    path = tmp_path / "p.tsv"
    if kind == "fifo":
        os.mkfifo(path)
    else:
        path.symlink_to("/dev/zero")
    with pytest.raises(ModelLoadError, match="not a regular file"):
        load_pattern(path, 2, 2)
