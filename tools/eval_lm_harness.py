"""lm-evaluation-harness through the server against the same numbers computed through `LLM` directly.

    pip install lm-eval            # not a test dependency: it brings datasets, evaluate, scikit-learn, ...
    python tools/eval_lm_harness.py [--model DIR|FILE.gguf] [--max-model-len N] [--out tools/results/eval_lm_harness.json]

It writes a small multiple-choice task (questions below, a local JSONL file: nothing is downloaded), starts
the OpenAI server in this process on 127.0.0.1, runs lm-eval's `local-completions` model on it
(loglikelihood requests: echo, logprobs=1, max_tokens=1, temperature 0, prompts as token ids from the
model's own tokenizer, saved as a Hugging Face tokenizer directory for lm-eval), then scores every choice
directly from `LLM.logits` (teacher-forced log-softmax over the same tokens) and compares: accuracy, and the
largest difference between the two loglikelihoods of any choice. Then the same questions as lettered
choices through `local-chat-completions` (lm-eval has no loglikelihood for chat APIs: a generation task,
greedy, the first letter A-D of the reply scored) against `LLM.chat` with the same messages and limits.
Exits 1 if an accuracy differs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from lserve_lite.config import path_name
from lserve_lite.engine_args import add_max_model_len, output_file
from lserve_lite.errors import exit_status

QUESTIONS = [
    ("The capital of France is", [" Paris", " Berlin", " Madrid", " Rome"], 0),
    ("The capital of Japan is", [" Seoul", " Tokyo", " Beijing", " Bangkok"], 1),
    ("The capital of Italy is", [" Milan", " Venice", " Rome", " Naples"], 2),
    ("The color of the sky on a clear day is", [" green", " red", " yellow", " blue"], 3),
    ("Two plus two equals", [" four", " five", " three", " ten"], 0),
    ("Water freezes at zero degrees", [" Kelvin", " Celsius", " Fahrenheit", " Rankine"], 1),
    ("The largest planet in the solar system is", [" Mars", " Venus", " Jupiter", " Mercury"], 2),
    ("A cat says", [" woof", " moo", " quack", " meow"], 3),
    ("The opposite of hot is", [" cold", " warm", " big", " fast"], 0),
    ("Bees make", [" milk", " honey", " silk", " wool"], 1),
    ("The first month of the year is", [" March", " June", " January", " May"], 2),
    ("The sun rises in the", [" west", " north", " south", " east"], 3),
    ("A week has seven", [" days", " hours", " years", " months"], 0),
    ("The chemical symbol for water is", [" CO2", " H2O", " NaCl", " O2"], 1),
    ("Shakespeare wrote Romeo and", [" Jane", " Mary", " Juliet", " Anne"], 2),
    ("The fastest land animal is the", [" snail", " turtle", " cow", " cheetah"], 3),
    ("Ice is frozen", [" water", " sand", " milk", " oil"], 0),
    ("The Earth orbits the", [" Moon", " Sun", " Mars", " comet"], 1),
    ("Paper is made from", [" glass", " steel", " wood", " stone"], 2),
    ("The number after nine is", [" seven", " eight", " five", " ten"], 3),
    ("People breathe", [" air", " sand", " rocks", " metal"], 0),
    ("Fish live in", [" trees", " water", " deserts", " clouds"], 1),
    ("The Eiffel Tower is in", [" London", " Madrid", " Paris", " Berlin"], 2),
    ("Grass is usually", [" purple", " orange", " blue", " green"], 3),
]

TASK_YAML = """task: lserve_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
target_delimiter: ""
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


CHAT_YAML = """task: lserve_mc_chat
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{letter}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 8
  do_sample: false
  temperature: 0
filter_list:
  - name: letter
    filter:
      - function: regex
        regex_pattern: "([ABCD])"
      - function: take_first
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""
CHAT_MAX_TOKENS, CHAT_STOP = 8, ["\n"]


def chat_prompt(q: str, choices: list[str]) -> str:
    lines = [f"{'ABCD'[i]}. {c.strip()}" for i, c in enumerate(choices)]
    return f"Complete: {q} ...\n" + "\n".join(lines) + "\nAnswer with one letter (A, B, C or D)."


def write_task(d: Path) -> None:
    data = d / "lserve_mc.jsonl"
    data.write_text(
        "".join(json.dumps({"question": q, "choices": c, "answer": a}) + "\n" for q, c, a in QUESTIONS)
    )
    (d / "lserve_mc.yaml").write_text(TASK_YAML.format(data=data))
    chat = d / "lserve_mc_chat.jsonl"
    rows = [{"prompt": chat_prompt(q, c), "letter": "ABCD"[a]} for q, c, a in QUESTIONS]
    chat.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "lserve_mc_chat.yaml").write_text(CHAT_YAML.format(data=chat))


def direct_chat(llm) -> list[str]:
    """Greedy replies from LLM.chat to the chat task's messages, with lm-eval's limits."""
    from lserve_lite import SamplingParams
    from lserve_lite.llm import succeeded

    params = SamplingParams(temperature=0, max_new_tokens=CHAT_MAX_TOKENS, stop=CHAT_STOP)
    msgs = [[{"role": "user", "content": chat_prompt(q, c)}] for q, c, _ in QUESTIONS]
    # a failed request is an error, not an answer ""
    return [succeeded(llm.chat(m, params)).text for m in msgs]


def first_letter(text: str) -> str:
    return next((ch for ch in text if ch in "ABCD"), "")


def write_hf_tokenizer(llm, d: Path) -> Path:
    """The engine's tokenizer as a directory transformers.AutoTokenizer loads (a GGUF's too)."""
    out = d / "tokenizer"
    out.mkdir()
    tok = llm.tokenizer
    tok.tok.save(str(out / "tokenizer.json"))
    cfg = {k: v for k, v in tok.cfg.items() if k != "chat_template"} | {
        "tokenizer_class": "PreTrainedTokenizerFast"
    }
    (out / "tokenizer_config.json").write_text(json.dumps(cfg))
    return out


def direct_loglikelihoods(llm) -> list[list[float]]:
    """Each choice's summed logprob given its question, from LLM.logits over the same token ids as lm-eval
    (context tokens + the rest of the tokenized context+continuation, no special tokens)."""
    out = []
    for q, choices, _ in QUESTIONS:
        ctx = llm.tokenizer.encode(q, add_special_tokens=False)
        row = []
        for c in choices:
            ids = llm.tokenizer.encode(q + c, add_special_tokens=False)
            x = llm.logits(ids).astype(np.float64)
            m = x.max(axis=1, keepdims=True)
            lp = x - m - np.log(np.exp(x - m).sum(axis=1, keepdims=True))
            row.append(float(sum(lp[j - 1, ids[j]] for j in range(len(ctx), len(ids)))))
        out.append(row)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="model directory or GGUF (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--backend", choices=["auto", "cpu", "cuda"], default="cpu")
    add_max_model_len(ap, "context limit in tokens (prompt + output), as chat's (default: the model's)")
    ap.add_argument("--out", type=output_file, default="tools/results/eval_lm_harness.json")
    args = ap.parse_args()
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError:
        print("eval_lm_harness: needs lm-evaluation-harness (pip install lm-eval)", file=sys.stderr)
        return 2

    from lserve_lite import LLM
    from lserve_lite.serve.app import ServerThread, create_app

    llm = LLM(args.model, backend=args.backend, max_model_len=args.max_model_len)
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        write_task(d)
        tok_dir = write_hf_tokenizer(llm, d)
        t0 = time.perf_counter()
        tasks = TaskManager(include_path=str(d))
        with ServerThread(create_app(llm.engine, served_model_name="m")) as url:
            res = lm_eval.simple_evaluate(
                model="local-completions",
                model_args=f"base_url={url}/v1/completions,model=m,tokenizer={tok_dir},tokenizer_backend=huggingface,"
                "tokenized_requests=True,num_concurrent=1,max_retries=1",
                tasks=["lserve_mc"], task_manager=tasks, log_samples=True,
            )  # fmt: skip
            t_server = time.perf_counter() - t0
            chat_res = lm_eval.simple_evaluate(
                model="local-chat-completions",
                model_args=f"base_url={url}/v1/chat/completions,model=m,num_concurrent=1,max_retries=1",
                tasks=["lserve_mc_chat"], task_manager=tasks, log_samples=True, apply_chat_template=True,
            )  # fmt: skip
    samples = sorted(res["samples"]["lserve_mc"], key=lambda s: s["doc_id"])
    server_ll = [[float(r[0]) for r in s["filtered_resps"]] for s in samples]
    t0 = time.perf_counter()
    direct_ll = direct_loglikelihoods(llm)
    t_direct = time.perf_counter() - t0
    acc_server = float(res["results"]["lserve_mc"]["acc,none"])
    acc_direct = float(np.mean([int(np.argmax(r)) == a for r, (_, _, a) in zip(direct_ll, QUESTIONS)]))
    diff = float(np.max(np.abs(np.asarray(server_ll) - np.asarray(direct_ll))))
    chat_samples = sorted(chat_res["samples"]["lserve_mc_chat"], key=lambda s: s["doc_id"])
    chat_server = [s["resps"][0][0] for s in chat_samples]
    chat_direct = direct_chat(llm)
    acc_chat_server = float(chat_res["results"]["lserve_mc_chat"]["exact_match,letter"])
    acc_chat_direct = float(
        np.mean([first_letter(t) == "ABCD"[a] for t, (_, _, a) in zip(chat_direct, QUESTIONS)])
    )
    report = {
        "model": path_name(llm.engine.model_dir), "backend": args.backend, "questions": len(QUESTIONS),
        "acc_lm_eval_server": acc_server, "acc_direct_llm": acc_direct, "max_abs_loglikelihood_diff": diff,
        "chat_acc_lm_eval_server": acc_chat_server, "chat_acc_direct_llm": acc_chat_direct,
        "chat_replies_identical": sum(a == b for a, b in zip(chat_server, chat_direct)),
        "chat_replies_differing": [(i, a, b) for i, (a, b) in enumerate(zip(chat_server, chat_direct)) if a != b],
        "seconds_lm_eval": round(t_server, 1), "seconds_direct": round(t_direct, 1), "lm_eval": lm_eval.__version__,
    }  # fmt: skip
    print(json.dumps(report, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return 0 if acc_server == acc_direct and acc_chat_server == acc_chat_direct else 1


if __name__ == "__main__":
    sys.exit(exit_status(main))
