"""Every model family in every common quant type: logits against transformers, decode speed against llama.cpp.

    .venv/bin/python benchmarks/families.py [--families llama,qwen2,qwen3,mistral,gemma3] [--types F16,Q8_0,...]
        [--layers 30] [--threads 2,1] [--tokens 64] [--prompt-tokens 128] [--dir DIR] [--json PATH]

One random-weight model per family, built from transformers' own config class as tests/models/test_families.py
builds its tiny ones, at one shape for all: SmolLM2-135M's layout (30 layers, 3 * 512 FFN, 4 query heads per KV
head of 64, a 49152-token vocabulary) at width 512 rather than 576, so that every matrix's rows are whole K-quant
blocks and llama.cpp quantizes each to the named type rather than to its fallback. Gemma 3 and Mistral get a
64-token sliding window, shorter than the longer prompts, so that the windowed attention is exercised. The model
is written as an F16 GGUF with gguf's writer (as llama.cpp's converter writes it: test_families.write_gguf) with
a byte-level BPE vocabulary llama.cpp accepts, and llama.cpp quantizes that file to each type. On each quantized
file, in one run:

- agreement: duskpool's logits over every position of three prompts (12, 40 and 100 tokens) against
  transformers' model of the same config holding the weights transformers' GGUF loader dequantizes (gguf-py) from
  the same file (byte for byte the same tensors, in a copy without the vocabulary, which gguf-py's reader would
  take seconds per 10 000 tokens to parse): the lowest cosine and the largest absolute difference, and whether 32
  greedy tokens after the longest prompt are the same. Where they part, the margin by which
  transformers' own logits prefer its token over ours at that step says whether it was a near-tie (random weights
  make those likelier than real ones do).
- speed: decode and prefill tok/s of duskpool and of llama.cpp on the file, each in its own process with the same
  threads, with benchmarks/decode.py's runners; ratios are duskpool / llama.cpp. On a machine with fewer idle
  cores than threads, llama.cpp's threads, which spin at a barrier after every op, lose whole time slices waiting
  for each other (on a shared 2-vCPU VM at load 3-9, its decode of a 6-layer model ranged 1-620 tok/s at two
  threads and 50-550 at one; at load 1.5, 520-620 at two): give --threads 2,1 to time at one thread as well.

The families keep test_families' choices: Llama, Qwen 2 and Mistral untied heads, Qwen 3 tied, Gemma 3 untied (a
random Gemma's embeddings, scaled by sqrt(dim), make a tied head repeat the last token). Types run one after the
other, every family in each, so that a run cut short still has every family in the first types.
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import gguf
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for benchmarks.decode and the tests' helpers

from benchmarks.decode import ENGINES, PARAGRAPH, peak_rss_mb  # noqa: E402
from tests.api.conftest import bpe_vocabulary, with_vocabulary  # noqa: E402
from tests.models.test_families import agreement, families, reference, run, their_run, write_gguf  # noqa: E402

from duskpool.backends import backend, load_span  # noqa: E402
from duskpool.weights.gguf import GGUFFile  # noqa: E402

Q = gguf.GGMLQuantizationType
SHAPE = dict(hidden_size=512, num_hidden_layers=30, num_attention_heads=8, num_key_value_heads=2,
             intermediate_size=1536, vocab_size=49152, max_position_embeddings=2048)
FAMILY_SHAPE = {  # keys a family's config names differently, or that only it has
    "qwen3": dict(head_dim=64),
    "mistral": dict(sliding_window=64),
    "gemma3": dict(head_dim=64, query_pre_attn_scalar=64, sliding_window=64),
}
TYPES = ["F16", "Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q4_0", "Q3_K_M", "Q2_K", "IQ4_XS"]  # llama.cpp's names
PROMPT_LENGTHS = (12, 40, 100)
GREEDY_AFTER = (100,)  # the prompts STEPS greedy tokens follow (transformers' generate is the slow part)
STEPS = 32


def random_model(name: str, layers: int):
    """The family's transformers model at SHAPE, random norms and biases too (as test_families.tiny_model)."""
    import transformers

    tiny = families()[name].config()
    keys = {**tiny.to_dict(), **SHAPE, "num_hidden_layers": layers, **FAMILY_SHAPE.get(name, {})}
    keys.pop("layer_types", None)  # derived from the layer count: rebuilt by the config
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(type(tiny)(**keys), dtype=torch.float32).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.ndim == 1:
                parameter.add_(torch.randn_like(parameter) * 0.2)
    return model




def quantize(source: Path, path: Path, qtype: str, threads: int) -> Path:
    """llama.cpp's quantization of `source` to its file type `qtype` (no importance matrix)."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{qtype}")
    params.nthread = threads
    if llama_cpp.llama_model_quantize(str(source).encode(), str(path).encode(), params) != 0:
        raise RuntimeError(f"llama.cpp could not quantize to {qtype}")
    return path


def tensor_types(path: Path) -> str:
    """The matrices' types in the file, most weights first: '83% Q4_K, 17% Q6_K'."""
    counts = Counter()
    for info in GGUFFile(path).tensors.values():
        if len(info.shape) > 1:
            counts[info.qtype.name] += int(np.prod(info.shape))
    total = sum(counts.values())
    return ", ".join(f"{100 * n / total:.0f}% {name}" for name, n in counts.most_common())


def without_vocabulary(path: Path, copy: Path) -> Path:
    """The file's tensors byte for byte and its model keys, without the vocabulary: what transformers is given
    (its GGUF loader parses every field with gguf-py's reader, which takes seconds per 10 000 tokens).
    The keys of our files are unsigned integers, floats and strings."""
    file = GGUFFile(path)
    writer = gguf.GGUFWriter(str(copy), file.architecture)
    for key, value in file.metadata.items():
        if not key.startswith(("tokenizer.", "general.architecture", "general.alignment")):
            add = {bool: writer.add_bool, int: writer.add_uint32, float: writer.add_float32}.get(type(value))
            (add or writer.add_string)(key, value)
    for name, info in file.tensors.items():
        data = file.read(name).data
        writer.add_tensor(name, data.reshape(info.shape[0], -1) if len(info.shape) > 1 else data,
                          raw_dtype=info.qtype)
    writer.write_header_to_file(), writer.write_kv_data_to_file(), writer.write_tensors_to_file(), writer.close()
    return copy


def compare(path: Path, config, prompts: list[list[int]]) -> dict:
    """duskpool against transformers on the file: logits over every prompt position, and STEPS greedy tokens."""
    ours = load_span(GGUFFile(path))
    copy = without_vocabulary(path, path.with_suffix(".no-vocabulary.gguf"))
    theirs = reference(copy, config)
    copy.unlink()
    cosine, max_diff, scale, greedy = 1.0, 0.0, 0.0, []
    for prompt in prompts:
        steps = STEPS if len(prompt) in GREEDY_AFTER else 0
        our_logits, our_tokens = run([ours], prompt, steps)
        their_logits, their_tokens = their_run(theirs, prompt, steps)
        c, d = agreement(our_logits, their_logits)
        cosine, max_diff, scale = min(cosine, c), max(max_diff, d), max(scale, their_logits.abs().max().item())
        if steps:
            greedy.append(parting(theirs, prompt, our_tokens, their_tokens))
    return {"cosine": cosine, "max_abs_diff": max_diff, "max_abs_logit": scale, "greedy": greedy}


def parting(model, prompt: list[int], ours: list[int], theirs: list[int]) -> dict:
    """Where the greedy tokens part (None: they don't), and by how much transformers prefers its token there."""
    step = next((i for i, (a, b) in enumerate(zip(ours, theirs, strict=True)) if a != b), None)
    if step is None:
        return {"step": None}
    with torch.no_grad():
        logits = model(torch.tensor([prompt + theirs[:step]])).logits[0, -1]
    return {"step": step, "margin": (logits[theirs[step]] - logits[ours[step]]).item()}


def speed(path: Path, args) -> dict:
    """decode.py's runners for duskpool and llama.cpp, each in its own process, at each thread count:
    {threads: {engine: figures}}."""
    results = {}
    for threads in args.threads:
        results[threads] = {}
        for engine in ("duskpool", "llama.cpp"):
            done = subprocess.run([sys.executable, __file__, "--child", engine, "--model", str(path),
                                   "--threads", str(threads), "--tokens", str(args.tokens),
                                   "--prompt-tokens", str(args.prompt_tokens)], capture_output=True, text=True)
            if done.returncode != 0:
                results[threads][engine] = {"error": (done.stderr.strip().splitlines() or ["failed"])[-1]}
            else:
                results[threads][engine] = json.loads(done.stdout.strip().splitlines()[-1])
    return results


def row(r: dict, threads: list[int]) -> str:
    """One markdown table row of a result."""
    cells = [r["family"], r["type"]]
    if "error" in r:
        return "| " + " | ".join(cells + [r["error"]] + [""] * (4 + 3 * len(threads))) + " |"
    cells += [r["tensor_types"], f"{r['file_mb']:.0f}"]
    a = r["agreement"]
    if "error" in a:
        cells += ["n/a", "n/a", f"n/a: {a['error']}"]
    else:
        same = [g for g in a["greedy"] if g["step"] is None]
        parted = "; ".join(f"step {g['step']}, margin {g['margin']:.2g}" for g in a["greedy"] if g["step"] is not None)
        cells += [f"{a['cosine']:.6f}", f"{a['max_abs_diff']:.1e} of {a['max_abs_logit']:.1f}",
                  f"{len(same)}/{len(a['greedy'])}" + (f" ({parted})" if parted else "")]
    for t in threads:
        ours, theirs = r["speed"][t]["duskpool"], r["speed"][t]["llama.cpp"]
        if "error" in ours or "error" in theirs:
            cells += [(ours.get("error") or theirs.get("error"))[:60], "", ""]
            continue
        cells += [f"{ours['decode_tok_s']:.0f} / {theirs['decode_tok_s']:.0f}",
                  f"{ours['decode_tok_s'] / theirs['decode_tok_s']:.2f}x",
                  f"{ours['prefill_tok_s'] / theirs['prefill_tok_s']:.2f}x"]
    return "| " + " | ".join(cells) + " |"


def header(threads: list[int]) -> str:
    columns = ["family", "type", "matrices (of their weights)", "MB", "min cosine", "max abs diff (of max abs logit)",
               "greedy 32 same"]
    for t in threads:
        columns += [f"decode tok/s duskpool / llama.cpp, {t} thr", f"decode ratio {t} thr", f"prefill ratio {t} thr"]
    return "| " + " | ".join(columns) + " |\n" + "|---" * len(columns) + "|"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", default="llama,qwen2,qwen3,mistral,gemma3")
    parser.add_argument("--types", default=",".join(TYPES), help="llama.cpp's file types (LLAMA_FTYPE_MOSTLY_*)")
    parser.add_argument("--layers", type=int, default=SHAPE["num_hidden_layers"])
    parser.add_argument("--threads", default="2", help="thread counts to time at, comma-separated (e.g. 2,1)")
    parser.add_argument("--tokens", type=int, default=64, help="greedy decode length timed")
    parser.add_argument("--prompt-tokens", type=int, default=128, help="prefill length timed")
    parser.add_argument("--dir", type=Path, help="keep the files here (default: a temporary folder, removed)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--child", choices=list(ENGINES), help=argparse.SUPPRESS)
    parser.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.threads = [int(t) for t in args.threads.split(",")]
    if args.tokens + 8 > args.prompt_tokens:  # decode.py's llama.cpp runner keeps --prompt-tokens rows of logits
        parser.error("--tokens must be at least 8 fewer than --prompt-tokens")

    if args.child:  # time one engine on one file in this process, report as JSON
        result = ENGINES[args.child](args.model, args.threads[0], args.tokens, args.prompt_tokens)
        print(json.dumps({**result, "peak_rss_mb": peak_rss_mb()}))
        return

    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    # the agreement is not timed: one thread each (two, on a loaded machine, spin against each other)
    torch.set_num_threads(1)
    backend().set_threads(1)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, SHAPE["vocab_size"], n).tolist() for n in PROMPT_LENGTHS]
    temporary = None if args.dir else tempfile.TemporaryDirectory()
    folder = args.dir or Path(temporary.name)
    folder.mkdir(parents=True, exist_ok=True)
    shape = {**SHAPE, "num_hidden_layers": args.layers}
    report = {"shape": shape, "threads": args.threads, "tokens": args.tokens, "prompt_tokens": args.prompt_tokens,
              "prompt_lengths": PROMPT_LENGTHS, "greedy_after": GREEDY_AFTER, "steps": STEPS, "results": []}
    sources, configs = {}, {}
    # a real vocabulary's size (its embedding and head cost what they cost in a real model), merges learned from the
    # benchmark paragraph
    vocabulary = bpe_vocabulary(PARAGRAPH * 4, 200, SHAPE["vocab_size"])
    for name in args.families.split(","):  # every family's F16 file first; of the model, only its config is kept
        model = random_model(name, args.layers)
        bare = write_gguf(model, families()[name], Q.F16, folder / f"{name}-bare.gguf")
        sources[name] = with_vocabulary(bare, folder / f"{name}-F16-source.gguf", vocabulary, "smollm")
        configs[name] = model.config
        bare.unlink()
        del model
    print(header(args.threads), flush=True)
    for qtype in args.types.split(","):  # type by type: a run cut short still has every family in the first types
        for name, source in sources.items():
            r = {"family": name, "type": qtype}
            started = time.perf_counter()
            try:
                path = quantize(source, folder / f"{name}-{qtype}.gguf", qtype, args.threads[0])
            except (RuntimeError, AttributeError) as e:
                r["error"] = str(e)
            else:
                r.update(tensor_types=tensor_types(path), file_mb=path.stat().st_size / 2**20)
                try:
                    r["agreement"] = compare(path, configs[name], prompts)
                except Exception as e:  # noqa: BLE001 -- a type one side cannot read is a result, not a crash
                    r["agreement"] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:80]}"}
                r["speed"] = speed(path, args)
                if not args.dir:
                    path.unlink()
            r["seconds"] = time.perf_counter() - started
            report["results"].append(r)
            print(row(r, args.threads), flush=True)
            if args.json:
                args.json.write_text(json.dumps(report, indent=1))
    print(f"\nshape {shape}; threads {args.threads}; logits over prompts of {PROMPT_LENGTHS} tokens, {STEPS} greedy "
          f"tokens after those of {GREEDY_AFTER}; decode {args.tokens} tokens, prefill {args.prompt_tokens}")


if __name__ == "__main__":
    main()
