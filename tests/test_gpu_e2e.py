"""GPU end-to-end checks with SmolLM2-135M-Instruct (gpu-marked): the CUDA backend against the CPU one.

- teacher-forced argmax equal to the CPU backend's at >= 99% of 1000+ positions;
- greedy generations of 32 tokens identical on >= 4 of 5 prompts;
- 64 concurrent requests through the engine all finish, with no KV page in use at the end.

Model: $LSERVE_SMOLLM2_GGUF (converted once into $LSERVE_SMOLLM2_DIR, default /tmp/lserve_smollm2_hf) if
set, else the default model directory. The CPU side comes from tests/data/smollm2_cpu_reference.json when
that file was made from the same GGUF (sha256), else it is computed live; set LSERVE_E2E_LIVE_CPU=1 to
always compute it. Rewrite the file with `python tests/test_gpu_e2e.py --write-reference [GGUF]`.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

REF_FILE = Path(__file__).parent / "data" / "smollm2_cpu_reference.json"
N_POSITIONS = 1100
GEN_TOKENS = 32
TEXT = """\
The history of the lighthouse begins with fires lit on hilltops to guide ships into harbor. The ancient \
Pharos of Alexandria, built in the third century BC, stood well over one hundred meters tall and was counted \
among the wonders of the world. Its keepers burned wood and later oil, and a polished bronze mirror is said \
to have thrown the light far out to sea. For centuries after its collapse, coastal towns relied on simple \
towers with open flames, which were smoky, dim, and expensive to maintain.
In 1822 the French physicist Augustin Fresnel presented a lens made of concentric rings of glass prisms. \
A Fresnel lens gathers light from a single lamp and bends it into a narrow, powerful beam, so a modest \
flame can be seen more than twenty miles away. Within a few decades, lighthouses around the world had been \
refitted, and each station was given its own pattern of flashes so that sailors could tell one from another.
Keeping a light was hard work. Keepers trimmed wicks through the night, polished brass and glass, logged \
the weather, and rowed out to help ships in distress. Some stations stood on bare rocks miles from shore, \
where supplies arrived by boat when the sea allowed, and families lived for months without visitors. \
Electricity changed everything: by the middle of the twentieth century most lights were automated, and \
the last keepers left their towers.
Today satellite navigation tells a ship its position to within a few meters, yet lighthouses still \
matter. Electronics fail, and a bright, familiar light on a dark coast is a check that needs no power on \
board. Many old towers are now museums, and volunteers climb their spiral stairs to show visitors the \
great lenses, which still turn slowly on beds of mercury or modern bearings.
Baking bread at home follows a similar arc from craft to routine. Flour, water, salt, and yeast are mixed \
and kneaded until the dough is smooth and elastic. Gluten, a network of proteins, traps the gas that the \
yeast produces, and the dough rises. A long, cool fermentation develops flavor: many bakers leave their \
dough in the refrigerator overnight. Shaping tightens the surface so the loaf holds its form, and a hot \
oven with steam lets the crust expand before it sets. The result depends on small choices, such as the \
protein content of the flour, the temperature of the kitchen, and the patience of the baker.
Programming languages, too, grew from hand-tuned machine code into tools that let people express ideas \
directly. Early programmers wrote instructions as numbers, then as short mnemonics in assembly language. \
FORTRAN, released in 1957, let scientists write formulas that a compiler translated into efficient code. \
Later languages added structured control flow, data types, modules, and objects. Each step moved some \
burden from the programmer to the machine, and each generation of hardware made that trade more \
affordable. Modern compilers perform hundreds of transformations, from removing dead code to reordering \
instructions so that a processor's pipelines stay full.
Rivers shape the land they cross. In their upper reaches they run fast and narrow, cutting V-shaped \
valleys into rock and carrying stones that grind the riverbed deeper each spring. Lower down the slope \
eases, the water slows, and the river begins to wander in wide loops called meanders. On the outside of \
each bend the current erodes the bank; on the inside it drops sand and gravel. Over centuries a meander \
can be cut off entirely, leaving a curved lake beside the new channel. Near the sea the river spreads its \
load of silt into a delta, building new land that farmers have valued since the first cities rose along \
the Nile, the Tigris, and the Yellow River.
The bicycle is a surprisingly recent invention. The first models, around 1817, had no pedals at all: the \
rider pushed along the ground with both feet. Pedals attached to the front wheel came in the 1860s, and to \
go faster makers simply enlarged that wheel, producing the tall and dangerous penny-farthing. The safety \
bicycle of the 1880s solved the problem with two wheels of equal size and a chain that drove the rear one. \
Pneumatic tires followed soon after, and within a decade cycling clubs, road maps, and repair shops had \
spread across Europe and North America. Women in particular found in the bicycle a new kind of freedom.
Memory, psychologists say, is less like a recording and more like a reconstruction. Each time we recall \
an event, the brain rebuilds it from fragments, filling gaps with what seems likely. This is efficient, \
since it lets us store the gist of countless experiences, but it also means that confident memories can \
be wrong. Studies of eyewitnesses show that a leading question asked days after an event can change what \
a person later reports having seen. Sleep helps consolidate new memories, and retrieval practice, such as \
testing oneself instead of rereading notes, makes them far more durable.
A small garden can feed a family for much of the summer if it is planned with care. Tomatoes, beans, and \
squash need full sun and steady water; lettuce and spinach prefer cooler weather and some shade. Compost \
improves almost any soil, holding moisture in sandy ground and loosening heavy clay. Planting in \
succession, a few seeds every two weeks, keeps the harvest coming instead of arriving all at once. Many \
gardeners keep a notebook of what they planted, where, and when, because the best advice for next year \
usually comes from the mistakes of this one.
A good explanation, whatever the subject, starts from what the reader already knows and adds one idea at \
a time. It names things consistently, gives an example before a rule, and says why a step matters, not \
only what it is. When a reader can predict the next sentence, the writer has done the job well.
"""
PROMPTS = [
    "The capital of France is",
    "Here is a short poem about the ocean:\n",
    "def fibonacci(n):\n",
    "Three tips for staying focused while studying:",
    "Once upon a time, in a small village,",
]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def model_source() -> tuple[Path, str]:
    """(model dir, sha256 of the GGUF it was converted from)."""
    gguf = os.environ.get("LSERVE_SMOLLM2_GGUF")
    if gguf:
        from lserve_lite.weights.gguf_import import convert_gguf

        out = Path(os.environ.get("LSERVE_SMOLLM2_DIR", "/tmp/lserve_smollm2_hf"))
        if not (out / ".complete").is_file():
            convert_gguf(gguf, out, progress=False, overwrite=True)
            (out / ".complete").write_text(gguf + "\n")
        return out, _sha256(Path(gguf))
    from lserve_lite.weights.default_model import GGUF_SHA256, default_model_dir

    return default_model_dir(), GGUF_SHA256


def cpu_reference(model_dir: Path, sha: str) -> dict:
    """The CPU backend's teacher-forced argmax and greedy generations (computed now)."""
    from lserve_lite import LLM, SamplingParams

    llm = LLM(str(model_dir), backend="cpu")
    ids = llm.tokenizer.encode(TEXT)[:N_POSITIONS]
    argmax = llm.logits(ids).argmax(-1)
    params = SamplingParams(temperature=0.0, max_new_tokens=GEN_TOKENS, ignore_eos=True)
    gens = [o.token_ids for o in llm.generate(PROMPTS, params)]
    return {
        "gguf_sha256": sha,
        "ids": [int(i) for i in ids],
        "argmax": [int(a) for a in argmax],
        "greedy": gens,
    }


def load_reference(model_dir: Path, sha: str) -> dict:
    if REF_FILE.is_file() and not os.environ.get("LSERVE_E2E_LIVE_CPU"):
        ref = json.loads(REF_FILE.read_text())
        if ref.get("gguf_sha256") == sha:
            return ref
    return cpu_reference(model_dir, sha)


@pytest.fixture(scope="module")
def smol():
    model_dir, sha = model_source()
    return model_dir, load_reference(model_dir, sha)


@pytest.fixture(scope="module")
def gpu_llm(smol):
    from lserve_lite import LLM
    from lserve_lite.config import EngineConfig

    return LLM(str(smol[0]), backend="cuda", config=EngineConfig(num_kv_pages=4096, max_num_seqs=64))


@pytest.mark.gpu
def test_teacher_forced_argmax_matches_cpu(smol, gpu_llm):
    ref = smol[1]
    ids = ref["ids"]
    assert len(ids) >= 1000
    tokens = gpu_llm.tokenizer.encode(TEXT)[:N_POSITIONS]
    assert tokens == ids, "tokenizer changed since the reference was made"
    got = gpu_llm.logits(ids).argmax(-1)
    agree = float(np.mean(got == np.asarray(ref["argmax"])))
    print(f"teacher-forced argmax agreement: {agree:.4f} over {len(ids)} positions")
    assert agree >= 0.99


@pytest.mark.gpu
def test_greedy_generations_match_cpu(smol, gpu_llm):
    from lserve_lite import SamplingParams

    params = SamplingParams(temperature=0.0, max_new_tokens=GEN_TOKENS, ignore_eos=True)
    outs = gpu_llm.generate(PROMPTS, params)
    same = [o.token_ids == want for o, want in zip(outs, smol[1]["greedy"], strict=True)]
    print(f"greedy generations identical: {sum(same)} of {len(same)}")
    assert all(len(o.token_ids) == GEN_TOKENS for o in outs)
    assert sum(same) >= 4


@pytest.mark.gpu
def test_64_concurrent_requests_finish_and_free_pages(gpu_llm):
    from lserve_lite import SamplingParams

    rng = np.random.default_rng(1)
    eng = gpu_llm.engine
    words = TEXT.split()
    rids = []
    for i in range(64):
        start = int(rng.integers(0, len(words) - 200))
        prompt = " ".join(words[start : start + int(rng.integers(3, 200))])
        params = SamplingParams(
            temperature=float(rng.choice([0.0, 0.7, 1.0])),
            top_k=int(rng.choice([0, 20])),
            top_p=float(rng.choice([1.0, 0.9])),
            repetition_penalty=float(rng.choice([1.0, 1.1])),
            max_new_tokens=int(rng.integers(4, 48)),
            seed=i,
        )
        rids.append(eng.add_request(prompt, params))
    finished = {}
    for _ in range(10_000):
        if not eng.has_unfinished():
            break
        for out in eng.step():
            if out.finished:
                finished[out.request_id] = out
    assert set(finished) == set(rids)
    assert all(o.finish_reason in ("stop", "length") for o in finished.values())
    assert eng.blocks.num_used == 0


if __name__ == "__main__" and "--write-reference" in sys.argv:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    rest = [a for a in sys.argv[1:] if a != "--write-reference"]
    if rest:
        os.environ["LSERVE_SMOLLM2_GGUF"] = rest[0]
    d, s = model_source()
    REF_FILE.parent.mkdir(parents=True, exist_ok=True)
    REF_FILE.write_text(json.dumps(cpu_reference(d, s)) + "\n")
    print(f"wrote {REF_FILE}")
