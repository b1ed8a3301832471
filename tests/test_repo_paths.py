"""No path of the machines this project is built on in the repository: results files record commands with `$OUT`
and relative paths (a device's output folder or checkout written into a JSON or a profile is a leak, and means
nothing to a reader). Reads every tracked file (`git ls-files`: caches and local model files are not the
repository)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# a home directory of root, the workplace's checkout and tool folders, or the shared folder beside a checkout
# (split so this file does not match itself)
MACHINE_PATH = re.compile(
    "/ro" + r"ot/|/wo" + r"rk/(main|notes|\.device|\.library|\.mirror)\b|\.\./sha" + r"red/"
)


def test_no_machine_paths():
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout.split(
        b"\0"
    )
    hits = []
    for name in filter(None, files):
        p = ROOT / name.decode()
        if not p.is_file() or p.stat().st_size > (8 << 20):
            continue
        text = p.read_bytes().decode("utf-8", errors="ignore")
        for m in MACHINE_PATH.finditer(text):
            hits.append(f"{name.decode()}:{text.count(chr(10), 0, m.start()) + 1}: {m.group(0)}")
    assert len(files) > 100, "git ls-files listed almost nothing: not the repository"
    assert not hits, "machine paths in the repository:\n" + "\n".join(hits[:20])


# The files README.md and docs/*.md name: repository paths (`tools/results/gpu_2026-12-06b/`, `kernels/layers.cu`),
# paths inside the package as the docs write them (`backends/cpu_select.py`, `sparse/plan.build_plan`) and
# `file::name` references (`tests/test_kv_quant.py::test_...`). A rename or a move leaves such a reference pointing
# at nothing, which a reader finds only by searching.
_TOP = r"(?:docs|tools|tests|lserve_lite|kernels)"
REPO_REF = re.compile(r"(?<![\w./$<{~-])(" + _TOP + r"/[\w./-]*[\w/])(?:::(\w+))?")
_PKG = ROOT / "lserve_lite"
_PKGS = sorted(p.name for p in _PKG.iterdir() if (p / "__init__.py").is_file()) + ["reference"]
PKG_REF = re.compile(r"(?<![\w./$<{~-])((?:" + "|".join(_PKGS) + r")[/.][\w./-]*[\w/])(?![\w{*(-])")
_EXTS = {"md", "json", "cu", "cuh", "tsv", "sh", "log", "png", "gguf", "jsonl", "txt"}


def _tracked() -> tuple[set[str], set[str]]:
    out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    files = {n.decode() for n in out.split(b"\0") if n}
    dirs = {"/".join(f.split("/")[:i]) for f in files for i in range(1, f.count("/") + 1)}
    return files, dirs


def _defines(path: str, name: str) -> bool:
    text = (ROOT / path).read_text(errors="ignore")
    if path.endswith(".py"):
        return re.search(rf"\b(def|class)\s+{name}\b|^{name}\s*[:=]", text, re.M) is not None
    return re.search(rf"\b{name}\b", text) is not None


def _package_ref_problem(ref: str, files: set[str], dirs: set[str]) -> str | None:
    """What is wrong with a reference inside the package as the docs write them: `backends/cpu_select.py`,
    `sparse/plan.build_plan`, `reference/page_stats.merge_page_stats`, `sparse/patterns/NAME/`,
    `harness.quant.norm_linear_ref`; None when it names something that is there."""
    bases = ["lserve_lite/", "lserve_lite/backends/"]
    if "/" not in ref:
        # dotted: checked where its second part is a module (`engine.step()` is a variable's call)
        parts = ref.split(".")
        mod = next((m for b in bases if (m := b + "/".join(parts[:2]) + ".py") in files), None)
        if mod is None or len(parts) < 3 or _defines(mod, parts[2]):
            return None
        return f"{ref}: {mod} does not define {parts[2]}"
    head, _, tail = ref.rstrip("/").rpartition("/")
    name, *rest = tail.split(".")
    path = f"{head}/{name}"
    if rest and rest[0] in _EXTS | {"py"}:
        if not any(b + path + "." + rest[0] in files for b in bases):
            return f"{ref} is not in lserve_lite/"
        return None
    mods = [b + path + ".py" for b in bases if b + path + ".py" in files]
    mods += [b + path + "/__init__.py" for b in bases if b + path + "/__init__.py" in files]
    if not rest:
        if mods or any(b + path in dirs for b in bases) or head.startswith("weights"):
            return None  # weights/NAME: a model folder under LSERVE_LITE_HOME
        return f"{ref} is not in lserve_lite/"
    if not mods:
        return None if head.startswith("weights") else f"{ref}: {path} is not a module of lserve_lite"
    attr = rest[0]
    if any(b + path + "/" + attr + ".py" in files for b in bases) or any(_defines(mod, attr) for mod in mods):
        return None
    return f"{ref}: {path} does not define {attr}"


def test_docs_name_existing_paths():
    files, dirs = _tracked()
    docs = ["README.md"] + sorted(f for f in files if f.startswith("docs/") and f.endswith(".md"))
    bad = []
    for doc in docs:
        text = (ROOT / doc).read_text()

        def miss(m, what, doc=doc, text=text):
            bad.append(f"{doc}:{text.count(chr(10), 0, m.start()) + 1}: {what}")

        for m in REPO_REF.finditer(text):
            path, name = m.group(1), m.group(2)
            before, after = text[max(0, m.start() - 6) : m.start()], text[m.end() : m.end() + 2]
            if before.endswith("--out ") or "__pycache__" in path:
                continue  # a command's output, written when it runs; a cache, never tracked
            if after[:1] in "{*[" or after in (".{", ".*") or path.endswith("_"):
                # a stem: name.{json,png}, name.*, prefix_*
                if not any(f.startswith(path) for f in files):
                    miss(m, f"nothing named {path}...")
                continue
            key = path.rstrip("/")
            if key not in files and key not in dirs:
                miss(m, f"{path} does not exist")
            elif name and key in files and not _defines(key, name):
                miss(m, f"{path} does not define {name}")
        for m in PKG_REF.finditer(text):
            problem = _package_ref_problem(m.group(1).rstrip("."), files, dirs)
            if problem:
                miss(m, problem)
    assert len(docs) > 5
    assert not bad, "README.md / docs name what is not there:\n" + "\n".join(bad)


# `docs/KV_QUANT.md, "fp16 on the CPU"`: a section named beside its file must be one of that file's headings or
# bold lead-ins (a renamed section leaves the reader searching for a title that is not there).
HERE_REF = re.compile(r'"([^"]{3,80})"\)?,? (above|below)\b')
SECTION_REF = re.compile(r'((?:docs/)?[A-Z_]+\.md)`?[,:;]?\s+(?:sections?\s+)?"([^"]+)"')


def test_docs_name_existing_sections():
    files, _ = _tracked()
    docs = ["README.md"] + sorted(f for f in files if f.startswith("docs/") and f.endswith(".md"))
    titles = {}
    for doc in docs:
        text = (ROOT / doc).read_text()
        titles[doc] = [line.lstrip("#").strip().lower() for line in text.splitlines() if line.startswith("#")]
        titles[doc] += [m.group(1).lower() for m in re.finditer(r"\*\*([^*]+)\*\*", text)]
    bad = []
    for doc in docs:
        text = (ROOT / doc).read_text()
        flat = re.sub(r"\s+", " ", text)
        for m in SECTION_REF.finditer(flat):
            target = (
                m.group(1)
                if m.group(1).startswith("docs/") or m.group(1) == "README.md"
                else "docs/" + m.group(1)
            )
            name = m.group(2).lower()
            if target not in titles:
                bad.append(f"{doc}: {target} does not exist")
            elif not any(name in t for t in titles[target]):
                bad.append(f'{doc}: {target} has no section "{m.group(2)}"')
        for m in HERE_REF.finditer(flat):  # "Title" above / below: a section of the same file
            if not any(m.group(1).lower() in t for t in titles[doc]):
                bad.append(f'{doc}: no section "{m.group(1)}" {m.group(2)}')
    assert not bad, "sections named that are not there:\n" + "\n".join(bad)


def test_docs_name_existing_tests():
    """A test named in README.md or docs/*.md (`test_stale_nan_past_a_context_does_not_reach_another_request`, with or
    without its file) is a test file or a test function of tests/: a renamed test leaves a claim with no check."""
    files, _ = _tracked()
    docs = ["README.md"] + sorted(f for f in files if f.startswith("docs/") and f.endswith(".md"))
    tests = [f for f in files if f.startswith("tests/") and f.endswith(".py")]
    names = {Path(f).stem for f in tests}
    for f in tests:
        names |= set(re.findall(r"\bdef (test_\w+)", (ROOT / f).read_text()))
    bad = [
        f"{doc}: {name}"
        for doc in docs
        for name in sorted(set(re.findall(r"\btest_[a-z0-9_]+", (ROOT / doc).read_text())))
        if name not in names
    ]
    assert not bad, "tests named that do not exist:\n" + "\n".join(bad)


def _pow2(v: int) -> str:
    """A limit as README writes it: powers of two from 2^16 up as 2^k, others as digits."""
    return f"2^{v.bit_length() - 1}" if v >= 1 << 16 and not v & (v - 1) else str(v)


def test_readme_limits_name_the_limits_the_code_enforces():
    """Each limit a request, an engine option or a model config is refused past is named in README Limits with the
    code's value: `n` up to 16, `logprobs` up to 20, `logit_bias` up to 1024 ids, `tools` up to 128, the engine's
    and the model config's size bounds were refused with no word of them where a user reads the limits."""
    from lserve_lite import chat_template, config, sampling_params, tokenizer
    from lserve_lite.engine import intake, tool_calls
    from lserve_lite.serve import protocol

    sp, b = sampling_params, config.SIZE_BOUNDS
    text = " ".join((ROOT / "README.md").read_text().split("## Limits", 1)[1].split())
    phrases = [
        f"`n` up to {sp.MAX_N} (on the server, prompts x `n` up to {protocol.MAX_CHOICES})",
        f"`logprobs` / `top_logprobs` up to {sp.MAX_LOGPROBS}",
        f"`stop_token_ids` up to {sp.MAX_STOP_TOKEN_IDS} ids",
        f"`logit_bias` up to {sp.MAX_LOGIT_BIAS} ids with biases in [{sp.BIAS_RANGE[0]:g}, {sp.BIAS_RANGE[1]:g}]",
        f"presence / frequency penalties in [{sp.PENALTY_RANGE[0]:g}, {sp.PENALTY_RANGE[1]:g}]",
        f"`repetition_penalty` in [{sp.REPETITION_PENALTY_RANGE[0]:g}, {sp.REPETITION_PENALTY_RANGE[1]:g}]",
        f"up to {tool_calls.MAX_TOOLS} `tools` named by 1-64 letters, digits, `_` or `-`",
        f"`chat_template` up to {_pow2(tokenizer.MAX_CALLER_TEMPLATE_CHARS)} characters",
        f"`cache_salt` a string of 1-{intake.MAX_CACHE_SALT} characters",
        f"`max_num_seqs` up to {config.MAX_NUM_SEQS}",
        f"`max_num_batched_tokens` up to {_pow2(config.MAX_BATCHED_TOKENS)}",
        f"`num_kv_pages` up to {_pow2(config.MAX_POOL_PAGES)}",
        f"`max_model_len` up to {_pow2(config.MAX_MODEL_LEN)}",
        f"`page_size` a power of two in [{config.PAGE_SIZES[0]}, {config.PAGE_SIZES[1]}]",
        f"a hidden size (and heads x head dim) up to {_pow2(b['hidden_size'])}",
        f"an FFN width up to {_pow2(b['intermediate_size'])}",
        f"up to {b['num_hidden_layers']} layers",
        f"a vocabulary up to {_pow2(b['vocab_size'])} tokens",
        f"`max_position_embeddings` up to {_pow2(b['max_position_embeddings'])}",
        f"at most {sp.MAX_STOP_STRINGS} stop strings of {sp.MAX_STOP_CHARS} characters",
        f"{_pow2(chat_template.MAX_STEPS)} template lines per rendering",
        f"{_pow2(chat_template.MAX_CHARS)} characters for any string they build and for their output",
        f"integer call arguments up to {_pow2(chat_template.MAX_CALL_INT)}",
        f"`**` exponents up to {chat_template.MAX_EXPONENT}",
    ]
    assert b["num_attention_heads"] == b["num_key_value_heads"] == b["head_dim"] == b["num_hidden_layers"]
    assert tool_calls.NAME.pattern == "[A-Za-z0-9_-]{1,64}"
    missing = [p for p in phrases if p not in text]
    assert not missing, "README Limits does not name these limits (or names other values):\n" + "\n".join(
        missing
    )


def test_readme_names_every_environment_variable_the_package_reads():
    """An `LSERVE_*` variable the engine reads is named in README.md (a kernel switch, a knob, the weights folder):
    `LSERVE_CUDA_GEMV`, `LSERVE_QGEMV_SPLIT` and `LSERVE_LITE_HOME` changed what the engine did or where it wrote
    with no word of them there."""
    readme = (ROOT / "README.md").read_text()
    read = {
        m.group(1)
        for p in (ROOT / "lserve_lite").rglob("*.py")
        for m in re.finditer(r"\"(LSERVE_[A-Z0-9_]+)\"", p.read_text())
    }
    assert len(read) > 10
    missing = sorted(v for v in read if not re.search(rf"\b{v}\b", readme))
    assert not missing, f"read by the package, not named in README.md: {missing}"


def test_readme_last_gpu_run_of_a_test_file_is_its_newest_log():
    """README's "`tests/test_gpu_X.py` last on an H100 on DATE, N passed" is the count of that file's newest log
    under tools/results/ (folders sort by date): it kept 2026-12-06's 109 after two later runs passed 112."""
    claims = re.findall(
        r"`tests/(test_gpu_\w+)\.py` last on an? H[12]00 on [\d-]+, (\d+) passed",
        " ".join((ROOT / "README.md").read_text().split()),
    )
    assert claims
    for stem, count in claims:
        logs = sorted((ROOT / "tools/results").glob(f"gpu_*/**/*{stem}.log"))
        newest = re.findall(r"(\d+) passed", logs[-1].read_text())
        assert newest[-1:] == [count], (
            f"README: {stem} {count} passed; {logs[-1].relative_to(ROOT)}: {newest}"
        )


def test_readme_command_list_shows_every_cli_command():
    """README's command-line block shows each `lserve-lite` subcommand: `bench` (prefill and decode tokens/s) had no
    line there or anywhere in README."""
    from lserve_lite.cli import build_parser

    commands = re.search(r"\{([\w,]+)\}", build_parser().format_usage()).group(1).split(",")
    block = (ROOT / "README.md").read_text().split("Command line:", 1)[1].split("\n\n", 2)[1]
    shown = set(re.findall(r"^ {4}lserve-lite (\w+)", block, re.M))
    assert len(commands) > 5 and not set(commands) - shown, (
        f"not in README's command list: {set(commands) - shown}"
    )


def test_readme_names_the_gpu_checks_harness_time_limit():
    """README said tools/gpu_check.sh runs "the kernel harness" in one go; its harness step stops at a time limit
    that a fresh machine's first compiles pass (2026-12-07: 62 rows of the harness in 200 s). README names the
    limit, which must be the script's."""
    limit = re.search(r"step kernels (\d+) ", (ROOT / "tools/gpu_check.sh").read_text()).group(1)
    readme = " ".join((ROOT / "README.md").read_text().split())
    assert f"the harness's {limit} s cover only part of its cases on a fresh machine" in readme


def test_readme_names_the_file_the_chat_repl_writes():
    """README said the quick start "writes nothing else" than the downloaded GGUF; `lserve-lite chat` keeps its
    input history in a file of the home directory, which README now names (the name the CLI writes)."""
    name = re.search(r'"(\.lserve_lite_history)"', (ROOT / "lserve_lite/cli.py").read_text()).group(1)
    assert f"`~/{name}`" in (ROOT / "README.md").read_text()
