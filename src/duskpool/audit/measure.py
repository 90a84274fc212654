"""`run_audit`: the hidden states each node would receive for held-out prompts, and what attackers recover.

The model is loaded one layer at a time (`BatchOps` under it, so attackers can batch their guesses);
the held-out prompts and the attackers' own text go through every layer once, and the states at the depths
audited are kept. Then, for each privacy-prefix depth d = 0..K, the three prefix attackers, and for each
privacy-suffix depth s = 0..S, the three suffix attackers (attacks.py says what each does).
"""

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch

from duskpool.audit import attacks, texts
from duskpool.audit.batching import BatchOps
from duskpool.audit.report import AuditReport
from duskpool.engine.runner import load_tokenizer
from duskpool.engine.tokenizer import Tokenizer
from duskpool.models import SpanModel, load_model
from duskpool.weights.catalog import bundled_model_path
from duskpool.weights.folder import ModelFolder, open_model
from duskpool.weights.gguf import GGUFFile, ModelFileError

DEFAULT_MAX_PREFIX = 4
DEFAULT_MAX_SUFFIX = 2
DEFAULT_CANDIDATES = 64
CORPUS_TOKENS = 1536  # of the 2,974 in corpus.txt (SmolLM2's tokenizer): the subsample, for time
RANDOM_SEQUENCES, WINDOW = 8, 128  # the attackers' random token sequences, and their text's window
# SipIt takes a candidate whose state is this close (relative L2) to the observed one without trying more: the
# true token's is within 1e-6 in float32, another's 3e-2 or more (SmolLM2, depths 1-4; the first position, which
# every later one attends to, is the closest call); 16-bit wire formats round by up to 4e-3
TOLERANCE = {"float32": 1e-3, "float16": 1e-2, "bfloat16": 1e-2}


def run_audit(model: str | Path | None = None, max_prefix: int = DEFAULT_MAX_PREFIX,
              max_suffix: int | None = DEFAULT_MAX_SUFFIX, *, held_out: Sequence[Sequence[int]] | None = None,
              training: Sequence[Sequence[int]] | None = None, candidates: int = DEFAULT_CANDIDATES,
              corpus_tokens: int = CORPUS_TOKENS, random_sequences: int = RANDOM_SEQUENCES,
              wire_dtype: str = "float32", progress: Callable[[str], None] | None = None) -> AuditReport:
    """Token recovery per attacker at privacy-prefix depths 0..max_prefix and suffix depths 0..max_suffix
    (None: no suffix side, and only the first max_prefix layers are run).

    `model`: a GGUF file or a model folder (the bundled model by default). `held_out` / `training`: token id
    sequences to attack / to fit the attackers on, instead of the shipped prompts and corpus (a model without a
    tokenizer gets random ids). `wire_dtype`: how hidden states cross the network (the gateway sends float32).
    """
    started, cpu_started = time.perf_counter(), time.process_time()
    say = progress or (lambda message: None)
    file = open_model(Path(model) if model is not None else bundled_model_path())
    ops = BatchOps()
    edge = load_model(file, ops, range(0), embed=True, head=True)
    L, V = edge.spec.n_layers, edge.spec.vocab_size
    K = max(0, min(max_prefix, L))
    S = None if max_suffix is None else max(0, min(max_suffix, L))
    last = L if S is not None else K  # the layers the sequences go through
    notes = [f"attackers know the public weights of every layer; SipIt tries the top {candidates} candidates of "
             "the other two attackers, so a token ranked lower by both is out of its reach"]
    tokenizer = _tokenizer(file)
    samples, corpus = _texts(tokenizer, V, held_out, training, corpus_tokens, notes)
    noise = texts.random_sequences(V, random_sequences, WINDOW, seed=3)  # vocabulary coverage (prefix side)

    say(f"hidden states of {len(samples)} held-out and {len(corpus) + len(noise)} training sequences "
        f"through {last} layers")
    keep = set(range(K + 1)) | (set(range(L - S, L + 1)) if S is not None else set())
    held = _Depths([edge.embed(s.tokens) for s in samples], keep, ops)
    own = _Depths([edge.embed(s) for s in corpus], keep, ops)
    rand = _Depths([edge.embed(s) for s in noise], set(range(K + 1)), ops)
    prefix_layers: list[SpanModel] = []
    suffix_layers: list[SpanModel] = []
    for i in range(last):
        layer = load_model(file, ops, range(i, i + 1), embed=False, head=False)
        held.step(layer, i + 1)
        own.step(layer, i + 1)
        if i < K:
            rand.step(layer, i + 1)
            prefix_layers.append(layer)
        if S is not None and i >= L - S:
            suffix_layers.append(layer)

    def wire(h: torch.Tensor) -> torch.Tensor:  # what the node receives: the bytes the gateway sends
        return ops.from_bytes(ops.to_bytes(h, wire_dtype), h.shape[0], h.shape[1], wire_dtype)

    offsets = [sum(len(s.tokens) for s in samples[:i]) for i in range(len(samples))]
    scored = torch.tensor([o + p for o, s in zip(offsets, samples, strict=True) for p in s.scored])
    secret = torch.tensor([o + p for o, s in zip(offsets, samples, strict=True) for p in s.secret], dtype=torch.long)
    truth = torch.tensor([t for s in samples for t in s.tokens])

    def score(guess: torch.Tensor, positions: torch.Tensor) -> float | None:
        return float((guess[positions] == truth[positions]).float().mean()) if len(positions) else None

    rows, examples = [], []
    vocab = attacks.embedding_table(edge, V)
    tables = attacks.propagate(vocab, prefix_layers, ops)
    train_tokens = torch.tensor([t for s in corpus + noise for t in s])
    for d in range(K + 1):
        say(f"prefix depth {d}" + (f": the vocabulary through layer {d - 1}" if d else ""))
        table = next(tables) if d else vocab
        observed = wire(torch.cat(held.at[d]))
        ranked = {"nearest": attacks.nearest(observed, table, candidates)}
        inverter = attacks.Inverter(torch.cat(own.at[d] + rand.at[d]), table[train_tokens])
        ranked["learned"] = attacks.nearest(inverter(observed), table, candidates)
        merged = _interleave(ranked["nearest"], ranked["learned"], candidates)
        guesses = {name: r[:, 0] for name, r in ranked.items()}
        with _one_thread():
            guesses["sipit"] = torch.tensor([t for s, o in zip(samples, offsets, strict=True) for t in attacks.sipit(
                s.tokens, observed[o:o + len(s.tokens)], merged[o:o + len(s.tokens)], set(range(len(s.tokens))) -
                set(s.scored), edge, prefix_layers[:d], ops, TOLERANCE[wire_dtype])])
        for name, guess in guesses.items():
            rows.append({"depth": d, "attacker": name, "recovery": score(guess, scored),
                         "secret_recovery": score(guess, secret)})
            if tokenizer is not None and samples[0].secret:  # what the attacker read of the PIN's prompt
                examples.append({"depth": d, "attacker": name,
                                 "text": tokenizer.decode(guess[scored[:len(samples[0].scored)]].tolist())})

    suffix_rows = _suffix(S, held, own, suffix_layers, edge, wire, scored) if S is not None else []
    return AuditReport(
        model=edge.spec.name, architecture=edge.spec.architecture, n_layers=L, vocab_size=V, rows=rows,
        suffix_rows=suffix_rows, tokens=len(scored), secret_tokens=len(secret), sequences=len(samples),
        training_tokens=sum(map(len, corpus + noise)), candidates=candidates, wire_dtype=wire_dtype,
        seconds=time.perf_counter() - started, cpu_seconds=time.process_time() - cpu_started, notes=notes,
        examples=examples)


def _texts(tokenizer: Tokenizer | None, vocab_size: int, held_out: Sequence[Sequence[int]] | None,
           training: Sequence[Sequence[int]] | None, corpus_tokens: int,
           notes: list[str]) -> tuple[list[texts.Sample], list[list[int]]]:
    """The sequences attacked and the attackers' own text, as given, else the shipped ones, else random ids."""
    if held_out is not None:
        samples = [texts.Sample(list(s), list(range(len(s))), []) for s in held_out]
    elif tokenizer is not None:
        samples = texts.held_out(tokenizer)
        if tokenizer.chat_template is not None:
            notes.append("chat-template tokens are public: not scored, and taken as known by SipIt")
    else:
        samples = texts.random_samples(vocab_size, 4, 32, seed=1)
        notes.append("the model has no tokenizer: held-out and training sequences are random token ids")
    if training is not None:
        corpus = [list(s) for s in training]
    elif tokenizer is not None:
        corpus = texts.windows(tokenizer.encode(texts.corpus()), WINDOW, corpus_tokens)
        notes.append(f"subsample: the attackers' text is the first {sum(map(len, corpus))} tokens of corpus.txt")
    else:
        corpus = texts.random_sequences(vocab_size, 8, 64, seed=2)
    return samples, corpus


def _suffix(S: int, held: "_Depths", own: "_Depths", suffix_layers: list[SpanModel], edge: SpanModel,
            wire: Callable[[torch.Tensor], torch.Tensor], scored: torch.Tensor) -> list[dict]:
    """Suffix depths 0..S: how often the node before the gateway's last s layers gets the answer's token."""
    L = edge.spec.n_layers
    rows = []
    answer = edge.head(torch.cat(held.at[L])).argmax(-1)  # the gateway's greedy next token at each position
    own_last = torch.cat(own.at[L])
    for s in range(S + 1):
        observed = [wire(h) for h in held.at[L - s]]
        lens = attacks.Inverter(torch.cat(own.at[L - s]), own_last)
        public = [attacks.through(suffix_layers[len(suffix_layers) - s:], h) for h in observed]
        guesses = {"logit-lens": edge.head(torch.cat(observed)).argmax(-1),
                   "tuned-lens": edge.head(lens(torch.cat(observed))).argmax(-1),
                   "public-layers": edge.head(torch.cat(public)).argmax(-1)}
        for name, guess in guesses.items():
            rows.append({"depth": s, "attacker": name,
                         "recovery": float((guess[scored] == answer[scored]).float().mean())})
    return rows


class _Depths:
    """Sequences pushed layer by layer, packed into one batch; `at[d]`: each one's states after layers [0, d),
    for the depths in `keep`."""

    def __init__(self, states: list[torch.Tensor], keep: set[int], ops: BatchOps):
        self.lengths, self.keep, self.ops = [h.shape[0] for h in states], keep, ops
        self.current = torch.cat(states)
        self.at: dict[int, list[torch.Tensor]] = {0: states} if 0 in keep else {}

    def step(self, layer: SpanModel, depth: int) -> None:
        with self.ops.packed(self.lengths):
            self.current = layer.forward_span(self.current, layer.new_cache(self.current.shape[0]), 0)
        if depth in self.keep:
            self.at[depth] = list(self.current.split(self.lengths))


@contextmanager
def _one_thread() -> Iterator[None]:
    """SipIt's batches are a few rows: torch's second thread would only wait for the first (a sixth of the CPU
    time on one thread, SmolLM2 at depth 3; far less wall time on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _interleave(a: torch.Tensor, b: torch.Tensor, k: int) -> torch.Tensor:
    """Per row, the first k distinct ids of a[0], b[0], a[1], b[1], ... (a's k are distinct: there are k)."""
    return torch.tensor([list(dict.fromkeys(v for pair in zip(x, y, strict=True) for v in pair))[:k]
                         for x, y in zip(a.tolist(), b.tolist(), strict=True)])


def _tokenizer(file: GGUFFile | ModelFolder) -> Tokenizer | None:
    try:
        return load_tokenizer(file)
    except ModelFileError:
        return None
