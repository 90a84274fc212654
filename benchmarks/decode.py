"""Decode and prefill speed and peak memory: duskpool vs transformers (bf16 and fp32) vs llama.cpp, one run.

    .venv/bin/python benchmarks/decode.py [--model PATH] [--threads 2] [--tokens 128] [--prompt-tokens 512] [--json]

Each engine runs in its own subprocess (so its peak RSS is its own) on the same GGUF file and the
same thread count; greedy decode of --tokens tokens (end tokens ignored), prefill of a
--prompt-tokens prompt. Ratios are duskpool / reference, measured in this run. transformers runs in bf16 and
in fp32: on a CPU without bf16 instructions (AVX2 only) bf16 decodes faster (half the bytes to read) but
prefills several times slower, so each is the stronger reference for one of the two.
"""

import argparse
import functools
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

PARAGRAPH = ("The history of computing is a story of machines getting smaller, faster and cheaper, "
             "and of people finding new things to do with them. ")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (2**20 if sys.platform == "darwin" else 2**10)


def prompt_tokens(tokenize, n: int) -> list[int]:
    tokens = tokenize(PARAGRAPH * (n // 10))
    if len(tokens) < n // 4:  # a random-weight model (random_gguf.py): its made-up vocabulary has no words
        return [2 + i % 1000 for i in range(n)]  # the same token ids for every engine instead
    assert len(tokens) >= n, "the benchmark paragraph is too short"
    return tokens[:n]


def run_duskpool(model: Path, threads: int, tokens: int, prefill: int) -> dict:
    import torch

    from duskpool.backends import backend
    from duskpool.engine.runner import LocalEngine

    backend().set_threads(threads)
    engine = LocalEngine.load(model)
    m = engine.model
    prompt = prompt_tokens(lambda text: engine.tokenizer.encode(text, add_special=False), prefill)

    def forward(ids: list[int], start: int, cache) -> torch.Tensor:
        return m.head(m.forward_span(m.embed(ids), cache, start)[-1:])[0]

    cache = m.new_cache(prefill + 8)
    forward(prompt[:16], 0, cache)  # warm up kernels and allocator
    started = time.perf_counter()
    forward(prompt, 0, cache)
    prefill_s = time.perf_counter() - started

    cache = m.new_cache(tokens + 16)
    token = int(forward(prompt[:8], 0, cache).argmax())
    started = time.perf_counter()
    for i in range(tokens):
        token = int(forward([token], 8 + i, cache).argmax())
    decode_s = time.perf_counter() - started
    return {"decode_tok_s": tokens / decode_s, "prefill_tok_s": prefill / prefill_s}


def run_transformers(model: Path, threads: int, tokens: int, prefill: int, dtype: str) -> dict:
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    torch.set_num_threads(threads)
    tok = transformers.AutoTokenizer.from_pretrained(model.parent, gguf_file=model.name)
    lm = transformers.AutoModelForCausalLM.from_pretrained(model.parent, gguf_file=model.name,
                                                           dtype=getattr(torch, dtype)).eval()
    prompt = torch.tensor([prompt_tokens(lambda text: tok(text)["input_ids"], prefill)])
    with torch.no_grad():
        lm(prompt[:, :16])
        started = time.perf_counter()
        lm(prompt)
        prefill_s = time.perf_counter() - started

        def timed(n: int) -> float:
            started = time.perf_counter()
            lm.generate(prompt[:, :8], max_new_tokens=n, min_new_tokens=n, do_sample=False)
            return time.perf_counter() - started

        decode_s = timed(tokens + 1) - timed(1)  # minus the prefill and setup of the same call
    return {"decode_tok_s": tokens / decode_s, "prefill_tok_s": prefill / prefill_s}


def run_llamacpp(model: Path, threads: int, tokens: int, prefill: int) -> dict:
    import llama_cpp

    from duskpool.weights.gguf import GGUFFile

    # a random-weight model (random_gguf.py) has a made-up BPE vocabulary without merges, which llama.cpp refuses to
    # load: it is loaded without one, and given token ids (a sentencepiece vocabulary, Gemma's, has no merges at all)
    metadata = GGUFFile(model).metadata
    made_up = metadata.get("tokenizer.ggml.model") == "gpt2" and "tokenizer.ggml.merges" not in metadata
    llm = llama_cpp.Llama(str(model), n_threads=threads, n_threads_batch=threads, n_ctx=prefill + tokens + 64,
                          n_batch=max(prefill, tokens + 16), verbose=False,  # llm.scores keeps n_batch rows
                          kv_overrides={"tokenizer.ggml.model": "none"} if made_up else None)
    prompt = prompt_tokens(lambda text: [] if made_up else llm.tokenize(text.encode(), add_bos=False), prefill)
    llm.eval(prompt[:16])
    llm.reset()
    started = time.perf_counter()
    llm.eval(prompt)
    prefill_s = time.perf_counter() - started
    llm.reset()
    llm.eval(prompt[:8])
    started = time.perf_counter()
    for _ in range(tokens):
        token = int(llm.scores[llm.n_tokens - 1].argmax())
        llm.eval([token])
    decode_s = time.perf_counter() - started
    return {"decode_tok_s": tokens / decode_s, "prefill_tok_s": prefill / prefill_s}


ENGINES = {"duskpool": run_duskpool,
           "transformers-bf16": functools.partial(run_transformers, dtype="bfloat16"),
           "transformers-fp32": functools.partial(run_transformers, dtype="float32"),
           "llama.cpp": run_llamacpp}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None, help="GGUF file (default: the bundled model)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=128, help="greedy decode length")
    parser.add_argument("--prompt-tokens", type=int, default=512, help="prefill length")
    parser.add_argument("--engines", default=",".join(ENGINES), help="comma-separated subset to run")
    parser.add_argument("--json", action="store_true", help="also print the figures as one JSON line, last")
    parser.add_argument("--child", choices=list(ENGINES), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.model is None:
        from duskpool.weights.catalog import bundled_model_path
        args.model = bundled_model_path()

    if args.child:  # measure one engine in this process and report as JSON
        result = ENGINES[args.child](args.model, args.threads, args.tokens, args.prompt_tokens)
        print(json.dumps({**result, "peak_rss_mb": peak_rss_mb()}))
        return

    results = {}
    for name in args.engines.split(","):
        print(f"running {name} ...", file=sys.stderr, flush=True)
        done = subprocess.run([sys.executable, __file__, "--child", name, "--model", str(args.model),
                               "--threads", str(args.threads), "--tokens", str(args.tokens),
                               "--prompt-tokens", str(args.prompt_tokens)], capture_output=True, text=True)
        if done.returncode != 0:
            print(f"  {name} skipped: {done.stderr.strip().splitlines()[-1]}", file=sys.stderr)
            continue
        results[name] = json.loads(done.stdout.strip().splitlines()[-1])

    print(f"model {args.model.name}, {args.threads} threads, decode {args.tokens} tokens greedy, "
          f"prefill {args.prompt_tokens} tokens")
    print(f"{'engine':<20}{'decode tok/s':>14}{'prefill tok/s':>15}{'peak RSS MB':>13}")
    for name, r in results.items():
        print(f"{name:<20}{r['decode_tok_s']:>14.1f}{r['prefill_tok_s']:>15.1f}{r['peak_rss_mb']:>13.0f}")
    ours = results.get("duskpool")
    for name, r in results.items():
        if ours and name != "duskpool":
            print(f"duskpool / {name}: decode {ours['decode_tok_s'] / r['decode_tok_s']:.2f}x, "
                  f"prefill {ours['prefill_tok_s'] / r['prefill_tok_s']:.2f}x, "
                  f"peak RSS {ours['peak_rss_mb'] / r['peak_rss_mb']:.2f}x")
    if args.json:
        print(json.dumps({"model": args.model.name, "threads": args.threads, "tokens": args.tokens,
                          "prompt_tokens": args.prompt_tokens, "engines": results}))


if __name__ == "__main__":
    main()
