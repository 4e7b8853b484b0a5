"""A RULER-style long-context suite (Hsieh et al. 2024, "RULER: What's the Real Context Size of
Your Long-Context Language Models?"), generated offline and seeded so that every policy sees the
same cases.

Tasks, named as in RULER (question answering is left out):

* retrieval: ``niah_single_1`` (a repeated noise paragraph as haystack, numeric value),
  ``niah_single_2`` (essays, numeric value), ``niah_single_3`` (essays, UUID value),
  ``niah_multikey_1`` (essays, 4 keys, one asked), ``niah_multikey_2`` (a haystack made of
  distractor needles), ``niah_multikey_3`` (distractor needles, UUID keys and values),
  ``niah_multivalue`` (one key with 4 values, all asked), ``niah_multiquery`` (4 keys asked at once);
* multi-hop tracing: ``vt`` (a chain ``VAR A = 12345``, ``VAR B = VAR A`` ... of 5 variables among
  noise: name every variable holding the value);
* aggregation: ``cwe`` (the 10 most common words of a numbered word list) and ``fwe`` (the 3 most
  frequent coded words of a Zipf-distributed text).

The templates, needles, answer prefixes and distributions follow RULER's ``synthetic`` tasks; the
essay haystack is the project's Paul Graham essays (:func:`hybridgen.eval.common.load_text`), the
key words are adjective-noun pairs from a short built-in list (RULER draws them from
``wonderwords``), and the common-word pool of ``cwe`` is the essays' vocabulary. ``vt`` and ``cwe``
carry one short solved example, as RULER's do (``cwe`` always the short one RULER uses below 4K).

A case is fitted to its context with the model's tokenizer: the prompt (chat-wrapped when the
tokenizer has a chat template, followed by the answer prefix RULER puts after the assistant turn)
is the longest that leaves ``max_new_tokens`` for the answer, to within one haystack unit (a
word, a sentence, a needle line). Scoring is RULER's: ``string_match_all`` (the share of the
reference strings present in the answer, case-insensitive) for every task here;
``string_match_part`` (any reference present) is RULER's QA metric and is provided for it.

Each case is prefilled once and replayed into every policy's cache (:mod:`hybridgen.eval.replay`);
the answer is decoded greedily through that cache until it ends, contains every reference, or
reaches the task's ``max_new_tokens``.
"""

from __future__ import annotations

import math
import random
import re
import string
import time
import uuid
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from typing import Callable, Mapping, Optional, Sequence

import torch
from tqdm import tqdm

from ..config import HybridConfig
from ..guard import require_hybrid_run
from ..hf.compat import cache_arg
from .common import running
from .replay import record_prefill, replay


# --- tasks ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TaskSpec:
    name: str
    kind: str  # "niah", "vt", "cwe" or "fwe"
    max_new_tokens: int
    metric: str = "all"  # "all": string_match_all; "part": string_match_part
    haystack: str = "essay"  # niah: "essay", "repeat" or "needle"
    key_type: str = "words"  # niah: "words" or "uuids"
    value_type: str = "numbers"  # niah: "numbers" or "uuids"
    num_keys: int = 1
    num_values: int = 1
    num_queries: int = 1


TASKS: dict[str, TaskSpec] = {
    t.name: t
    for t in (
        TaskSpec("niah_single_1", "niah", 32, haystack="repeat"),
        TaskSpec("niah_single_2", "niah", 32),
        TaskSpec("niah_single_3", "niah", 64, value_type="uuids"),
        TaskSpec("niah_multikey_1", "niah", 32, num_keys=4),
        TaskSpec("niah_multikey_2", "niah", 32, haystack="needle"),
        TaskSpec("niah_multikey_3", "niah", 64, haystack="needle", key_type="uuids", value_type="uuids"),
        TaskSpec("niah_multivalue", "niah", 64, num_values=4),
        TaskSpec("niah_multiquery", "niah", 64, num_keys=4, num_queries=4),
        TaskSpec("vt", "vt", 48),
        TaskSpec("cwe", "cwe", 96),
        TaskSpec("fwe", "fwe", 48),
    )
}
TASK_NAMES = tuple(TASKS)

NIAH_TEMPLATE = (
    "Some special magic {type_v} are hidden within the following text. Make sure to memorize it. "
    "I will quiz you about the {type_v} afterwards.\n{context}\n"
    "What are all the special magic {type_v} for {query} mentioned in the provided text?"
)
NIAH_NEEDLE = "One of the special magic {type_v} for {key} is: {value}."
NIAH_PREFIX = "The special magic {type_v} for {query} mentioned in the provided text {verb}"
#: RULER's noise for the "repeat" haystack and for variable tracking.
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
#: RULER's 40 needle depths (percent of the essay's sentences).
DEPTHS = tuple(round(100 * i / 39) for i in range(40))

VT_TEMPLATE = (
    "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n{context}\n"
    "Question: Find all variables that are assigned the value {query} in the text above."
)
VT_PREFIX = (
    "Answer: According to the chain(s) of variable assignment in the text above, {n} variables are assigned "
    "the value {query}, they are:"
)
CWE_TEMPLATE = (
    "Below is a numbered list of words. In these words, some appear more often than others. "
    "Memorize the ones that appear most often.\n{context}\nQuestion: What are the 10 most common words in the "
    "above list?"
)
CWE_PREFIX = "Answer: The top 10 words that appear most often in the list are:"
FWE_TEMPLATE = (
    "Read the following coded text and track the frequency of each coded word. Find the three most frequently "
    "appeared coded words. {context}\nQuestion: Do not provide any explanation. Please ignore the dots '....'. "
    "What are the three most frequently appeared words in the above coded text?"
)
FWE_PREFIX = "Answer: According to the coded text above, the three most frequently appeared words are:"

# Keys of the word-keyed needles: adjective-noun pairs (RULER's come from wonderwords' lists).
_ADJECTIVES = (
    "able ancient angry bitter bold brave bright broad calm careful cheerful clever cold crooked curious "
    "damp dark eager early elegant empty fancy fierce gentle giant glossy golden grumpy hollow honest hungry "
    "icy jolly lazy lively loud lucky mellow misty narrow nervous noisy odd orange pale plain polite proud "
    "purple quick quiet rapid rough round rusty salty shaggy sharp shiny silent silly slow smooth soft sour "
    "spicy steady sticky stormy strange sturdy sweet swift tame tidy tiny tough vast wicked wide wild witty"
).split()
_NOUNS = (
    "anchor apple badge basket beacon blanket bottle bridge bucket button cabin camera candle canyon carpet "
    "castle cellar chimney clock cloud comet compass cottage crayon crystal curtain desert diamond dragon "
    "engine falcon feather fiddle forest fountain garden glacier hammer harbor helmet island jacket kettle "
    "ladder lantern lemon magnet meadow mirror monkey needle orchard otter paddle parrot pebble pepper pillow "
    "planet pocket pumpkin puzzle rabbit ribbon river rocket saddle shovel spider statue teapot thimble "
    "thunder tiger tunnel turtle valley violin wagon walrus whistle window wizard"
).split()


# --- scoring --------------------------------------------------------------------------------------
def postprocess(prediction: str) -> str:
    """RULER's clean-up of an answer: control characters become newlines, ends stripped."""
    return re.sub(r"[\x00-\x1f]", "\n", prediction.strip()).strip()


def string_match_all(prediction: str, references: Sequence[str]) -> float:
    """Share of ``references`` contained in ``prediction`` (case-insensitive): RULER's metric for
    retrieval, tracing and aggregation."""
    low = postprocess(prediction).lower()
    return sum(r.lower() in low for r in references) / len(references)


def string_match_part(prediction: str, references: Sequence[str]) -> float:
    """1 when any of ``references`` is contained in ``prediction`` (case-insensitive), else 0:
    RULER's metric for question answering."""
    low = postprocess(prediction).lower()
    return float(any(r.lower() in low for r in references))


METRICS = {"all": string_match_all, "part": string_match_part}


# --- generators -----------------------------------------------------------------------------------
@lru_cache(maxsize=4)
def _essay_words(text: str) -> tuple[str, ...]:
    return tuple(re.sub(r"\s+", " ", text).strip().split(" "))


@lru_cache(maxsize=4)
def _word_pool(text: str) -> tuple[str, ...]:
    """The essays' distinct lowercase words of 4 to 10 letters that are no part of another word of
    the pool (so that a substring match names one word), sorted."""
    words = sorted(set(re.findall(r"\b[a-z]{4,10}\b", text)))
    joined = "\n".join(words)
    return tuple(w for w in words if joined.count(w) == 1)


@lru_cache(maxsize=1)
def _default_essays() -> str:
    from .common import load_text

    return load_text("essays")


def _number(rng: random.Random) -> str:
    return str(rng.randint(1_000_000, 9_999_999))


def _uuid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def _word_key(rng: random.Random) -> str:
    return f"{rng.choice(_ADJECTIVES)}-{rng.choice(_NOUNS)}"


def _random(kind: str, rng: random.Random) -> str:
    return {"numbers": _number, "uuids": _uuid, "words": _word_key}[kind](rng)


def _sentences(text: str) -> list[str]:
    return [s for s in re.split(r"(?<=[.!?])\s+", text) if s]


@dataclass
class _Draft:
    """A case before wrapping: the user message, the answer prefix and the references."""

    body: str
    prefix: str
    references: list[str]


def _niah(spec: TaskSpec, rng: random.Random, size: int, essay: str) -> _Draft:
    keys, values, needles = [], [], []
    for _ in range(spec.num_keys):
        key = _random(spec.key_type, rng)
        while key in keys:
            key = _random(spec.key_type, rng)
        keys.append(key)
        values.append([_random(spec.value_type, rng) for _ in range(spec.num_values)])
        needles += [NIAH_NEEDLE.format(type_v=spec.value_type, key=key, value=v) for v in values[-1]]
    rng.shuffle(needles)
    if spec.haystack == "essay":
        sents = _sentences(" ".join(_essay_words(essay)[:size]))
        cuts = sorted(int(len(sents) * d / 100) for d in rng.sample(DEPTHS, len(needles)))
        parts, last = [], 0
        for cut, needle in zip(cuts, needles):
            parts += [*sents[last:cut], needle]
            last = cut
        context = " ".join(parts + sents[last:])
    else:
        if spec.haystack == "repeat":
            lines = [NOISE] * size
        else:  # a haystack of distractor needles, none with a key that is asked
            lines = []
            while len(lines) < size:
                key = _random(spec.key_type, rng)
                if key not in keys:
                    value = _random(spec.value_type, rng)
                    lines.append(NIAH_NEEDLE.format(type_v=spec.value_type, key=key, value=value))
        for index, needle in zip(sorted(rng.sample(range(size + 1), len(needles)), reverse=True), needles):
            lines.insert(index, needle)
        context = "\n".join(lines)
    asked = rng.sample(range(spec.num_keys), spec.num_queries)
    queries = [keys[i] for i in asked]
    answers = [v for i in asked for v in values[i]]
    query = queries[0] if len(queries) == 1 else ", ".join(queries[:-1]) + ", and " + queries[-1]
    template, type_v, verb = NIAH_TEMPLATE, spec.value_type, "are"
    if len(answers) == 1:  # RULER's singular wording
        template = template.replace("Some", "A").replace("are all", "is").replace("are", "is")
        template = template.replace("answers", "answer")
        type_v, verb = type_v[:-1], "is"
    body = template.format(type_v=type_v, context=context, query=query)
    return _Draft(body, NIAH_PREFIX.format(type_v=type_v, query=query, verb=verb), answers)


def _vt_chain(rng: random.Random, hops: int, taken: set) -> tuple[list[str], list[str], str]:
    names = []
    while len(names) < hops + 1:
        name = "".join(rng.choices(string.ascii_uppercase, k=5))
        if name not in taken:
            taken.add(name)
            names.append(name)
    value = str(rng.randint(10000, 99999))
    chain = [f"VAR {names[0]} = {value}"] + [f"VAR {names[j + 1]} = VAR {names[j]}" for j in range(hops)]
    return names, chain, value


def _vt_text(rng: random.Random, noises: int, chain: list[str]) -> str:
    lines = [NOISE] * noises
    for j, pos in enumerate(sorted(rng.sample(range(noises + 1), len(chain)))):
        lines.insert(pos + j, chain[j])
    return "\n".join(lines)


def _vt(spec: TaskSpec, rng: random.Random, size: int, essay: str, hops: int = 4) -> _Draft:
    taken: set = set()
    names, chain, value = _vt_chain(rng, hops, taken)
    ex_names, ex_chain, ex_value = _vt_chain(rng, hops, taken)
    example = (
        VT_TEMPLATE.format(context=_vt_text(rng, 5, ex_chain), query=ex_value)
        + " "
        + VT_PREFIX.format(n=hops + 1, query=ex_value)
        + " "
        + " ".join(ex_names)
    )
    body = example + "\n\n" + VT_TEMPLATE.format(context=_vt_text(rng, size, chain), query=value)
    return _Draft(body, VT_PREFIX.format(n=hops + 1, query=value), names)


def _cwe_list(rng: random.Random, pool: Sequence[str], words: int, common: int, uncommon: int) -> tuple[str, list]:
    chosen = rng.sample(pool, words)
    top, rest = chosen[:10], chosen[10:]
    entries = top * common + rest * uncommon
    rng.shuffle(entries)
    return " ".join(f"{i + 1}. {w}" for i, w in enumerate(entries)), top


def _cwe(spec: TaskSpec, rng: random.Random, size: int, essay: str, context: int) -> _Draft:
    pool = _word_pool(essay)
    example, example_top = _cwe_list(rng, pool, 20, 3, 1)  # RULER's short example
    common, uncommon = (30, 3) if context >= 4096 else (6, 1)  # RULER's frequencies
    text, top = _cwe_list(rng, pool, min(10 + size, len(pool)), common, uncommon)
    solved = " ".join(f"{i + 1}. {w}" for i, w in enumerate(example_top))
    body = (
        CWE_TEMPLATE.format(context=example)
        + " "
        + CWE_PREFIX
        + " "
        + solved
        + "\n"
        + CWE_TEMPLATE.format(context=text)
    )
    return _Draft(body, CWE_PREFIX, top)


def _fwe(spec: TaskSpec, rng: random.Random, size: int, essay: str, context: int, alpha: float = 2.0) -> _Draft:
    vocab_size = max(context // 50, 8)
    vocab: set = set()
    while len(vocab) < vocab_size:
        vocab.add("".join(rng.choices(string.ascii_lowercase, k=6)))
    ranked = sorted(vocab)
    rng.shuffle(ranked)
    ranked[0] = "..."  # the most frequent "word" is noise, as in RULER
    zeta = sum(k**-alpha for k in range(1, 100_000)) + 100_000 ** (1 - alpha) / (alpha - 1)
    words = [w for k, w in enumerate(ranked, 1) for _ in range(int(size * k**-alpha / zeta))]
    rng.shuffle(words)
    return _Draft(FWE_TEMPLATE.format(context=" ".join(words)), FWE_PREFIX, ranked[1:4])


def _draft(spec: TaskSpec, seed: str, size: int, essay: str, context: int) -> _Draft:
    rng = random.Random(seed)  # a fresh generator per size: the same case grows with its haystack
    if spec.kind == "niah":
        return _niah(spec, rng, size, essay)
    if spec.kind == "vt":
        return _vt(spec, rng, size, essay)
    if spec.kind == "cwe":
        return _cwe(spec, rng, size, essay, context)
    return _fwe(spec, rng, size, essay, context)


def _min_size(spec: TaskSpec) -> int:
    return {"niah": 64 if spec.haystack == "essay" else 4, "vt": 4, "cwe": 10, "fwe": 64}[spec.kind]


def _max_size(spec: TaskSpec, essay: str) -> int:
    if spec.kind == "niah" and spec.haystack == "essay":
        return len(_essay_words(essay))
    if spec.kind == "cwe":
        return len(_word_pool(essay)) - 10
    return 1 << 24


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def wrap(tokenizer, body: str, prefix: str) -> str:
    """The prompt text: ``body`` as the user's message of the model's chat format followed by the
    answer prefix (as RULER places it after the assistant turn); without a chat template, the body,
    a newline and the prefix."""
    if has_chat_template(tokenizer):
        chat = tokenizer.apply_chat_template(
            [{"role": "user", "content": body}], add_generation_prompt=True, tokenize=False
        )
        return chat + prefix
    return body + "\n" + prefix


def encode(tokenizer, prompt: str) -> list[int]:
    """Token ids of a :func:`wrap`\\ ped prompt (a chat template brings its own special tokens)."""
    ids = tokenizer(prompt, add_special_tokens=not has_chat_template(tokenizer))["input_ids"]
    return list(ids.tolist() if hasattr(ids, "tolist") else ids)


@dataclass
class RulerCase:
    task: str
    context: int
    sample: int
    prompt: str
    input_ids: list[int] = field(repr=False)
    references: list[str]
    max_new_tokens: int
    metric: str
    #: Haystack units (words, sentences, needle lines, list entries) the case was fitted with.
    size: int

    @property
    def length(self) -> int:
        return len(self.input_ids)

    def score(self, answer: str) -> float:
        return METRICS[self.metric](answer, self.references)


def generate_case(
    task: str, tokenizer, context: int, sample: int, seed: int = 0, essay: Optional[str] = None
) -> RulerCase:
    """Case ``sample`` of ``task`` for a ``context``-token window: the longest prompt that leaves
    the task's ``max_new_tokens`` for the answer (``essay``: the haystack text; default the
    project's essays). The same arguments give the same case."""
    if task not in TASKS:
        raise ValueError(f"unknown RULER task {task!r}: expected one of {', '.join(TASK_NAMES)}")
    spec = TASKS[task]
    essay = _default_essays() if essay is None else essay
    key = f"ruler:{seed}:{task}:{context}:{sample}"
    target = context - spec.max_new_tokens
    cache: dict = {}

    def build(size: int):
        if size not in cache:
            draft = _draft(spec, key, size, essay, context)
            prompt = wrap(tokenizer, draft.body, draft.prefix)
            cache[size] = (draft, prompt, encode(tokenizer, prompt))
        return cache[size]

    lo, top = _min_size(spec), _max_size(spec, essay)
    if len(build(lo)[2]) > target:
        raise ValueError(
            f"a context of {context} tokens is too small for {task} ({len(build(lo)[2])} prompt tokens at least, "
            f"plus {spec.max_new_tokens} for the answer)"
        )
    hi = lo
    while len(build(hi)[2]) <= target:  # double until too long (lo: the last that fits)
        if hi >= top:
            raise ValueError(f"the essays are too short for {task} at a context of {context} tokens")
        lo, hi = hi, min(2 * hi, top)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if len(build(mid)[2]) <= target else (lo, mid)
    draft, prompt, ids = build(lo)
    return RulerCase(task, context, sample, prompt, ids, draft.references, spec.max_new_tokens, spec.metric, lo)


# --- running --------------------------------------------------------------------------------------
@dataclass
class RulerResult:
    task: str
    context: int
    sample: int
    policy: str
    score: float
    answer: str
    references: list[str]
    prompt_tokens: int
    new_tokens: int
    #: Per decode step and layer, the mean host tokens each head attended to (or had fetched),
    #: and the mean tokens in the host tier; None without a HybridCache (the reference).
    k_mean: Optional[float] = None
    host_tokens_mean: Optional[float] = None
    #: Host keys the CPU read per step and KV head (page summaries included).
    keys_read_mean: Optional[float] = None
    seconds: float = 0.0


def _answer(model, tokenizer, recorded, config, case: RulerCase) -> tuple:
    """Greedy answer through ``config``'s cache (``None``: the model's own attention); also the
    decode steps made and, from the cache's telemetry, the mean host tokens attended, held and
    whose keys the CPU read per step and head."""
    from ..hf import patch, unpatch

    if config is not None:
        patch(model, config)
    try:
        cache, logits, tokens, steps = replay(model, recorded, config), recorded.logits, [], 0
        with torch.inference_mode():
            for _ in range(case.max_new_tokens):
                token = int(logits.argmax())
                if token == tokenizer.eos_token_id:
                    break
                tokens.append(token)
                if case.score(tokenizer.decode(tokens, skip_special_tokens=True)) == 1.0:
                    break  # every reference is in the answer: more tokens cannot take one out
                step = torch.tensor([[token]], device=model.device)
                logits = model(step, **cache_arg(cache), use_cache=True).logits[0, -1]
                steps += 1
        k_mean = host_mean = read_mean = None
        if config is not None and steps:
            require_hybrid_run(
                cache,
                what=f"ruler {case.task} with policy {config.policy}",
                decode_steps=steps,
                context_tokens=recorded.length,
            )
            records = list(cache.telemetry.records)
            if records:
                k_mean = sum(r.k for r in records) / len(records)
                host_mean = sum(r.host_tokens for r in records) / len(records)
                read_mean = sum(r.keys_read for r in records) / len(records)
    finally:
        if config is not None:
            unpatch(model)
    answer = tokenizer.decode(tokens, skip_special_tokens=True).strip()
    return answer, len(tokens), k_mean, host_mean, read_mean


def run_suite(
    model,
    tokenizer,
    policies: Mapping[str, Callable[[int], Optional[HybridConfig]]],
    tasks: Sequence[str],
    contexts: Sequence[int],
    samples: int,
    seed: int = 0,
    essay: Optional[str] = None,
    progress: bool = False,
) -> tuple[list[RulerResult], dict]:
    """Every policy on ``samples`` cases of every task at every context. ``policies`` maps a name
    to a function giving its configuration for a context length (``None``: the model's own
    attention). Returns the results and the seconds spent generating, prefilling and decoding
    (per policy)."""
    grid = [(n, t, s) for n in contexts for t in tasks for s in range(samples)]
    timing = {"generate": 0.0, "prefill": 0.0, "decode": dict.fromkeys(policies, 0.0)}
    results = []
    bar = tqdm(total=len(grid) * len(policies), desc="ruler cases x policies", disable=not progress)
    for n, task, sample in grid:
        bar.set_postfix_str(f"{task} @ {n}")
        t0 = time.perf_counter()
        case = generate_case(task, tokenizer, n, sample, seed, essay)
        t1 = time.perf_counter()
        recorded = record_prefill(model, torch.tensor([case.input_ids]))
        timing["generate"] += t1 - t0
        timing["prefill"] += time.perf_counter() - t1
        for policy, config_for in policies.items():
            t0 = time.perf_counter()
            with running(policy):  # e.g. the forced CPU-bound branch of scheduler_cpu_bound
                answer, new, k_mean, host_mean, read_mean = _answer(model, tokenizer, recorded, config_for(n), case)
            seconds = time.perf_counter() - t0
            timing["decode"][policy] += seconds
            results.append(
                RulerResult(
                    task=task,
                    context=n,
                    sample=sample,
                    policy=policy,
                    score=case.score(answer),
                    answer=answer,
                    references=case.references,
                    prompt_tokens=case.length,
                    new_tokens=new,
                    k_mean=k_mean,
                    host_tokens_mean=host_mean,
                    keys_read_mean=read_mean,
                    seconds=seconds,
                )  # fmt: skip
            )
            bar.update()
        del recorded
    bar.close()
    return results, timing


# --- reporting ------------------------------------------------------------------------------------
def _mean(xs):
    xs = list(xs)
    return sum(xs) / len(xs) if xs else float("nan")


def summarize(results: Sequence[RulerResult], reference: str = "full") -> dict:
    """Per policy: the mean score × 100 per context and task, the average over tasks per context
    and over everything, its gap to ``reference``, and the share of host keys read (the mean
    selected host tokens per step over the host tokens; None where no host tokens were read)."""
    policies = list(dict.fromkeys(r.policy for r in results))
    contexts = sorted({r.context for r in results})
    tasks = [t for t in TASK_NAMES if any(r.task == t for r in results)]
    table: dict = {}
    for p in policies:
        mine = [r for r in results if r.policy == p]
        scores = {
            str(n): {t: 100 * _mean(r.score for r in mine if r.context == n and r.task == t) for t in tasks}
            for n in contexts
        }
        average = {str(n): _mean(scores[str(n)].values()) for n in contexts}
        ks = [r for r in mine if r.k_mean is not None]
        k_mean = _mean(r.k_mean for r in ks) if ks else None
        host = _mean(r.host_tokens_mean for r in ks) if ks else None
        reads = [r for r in ks if r.keys_read_mean is not None]
        table[p] = {
            "scores": scores,
            "average": average,
            "overall": _mean(v for n in contexts for v in scores[str(n)].values()),
            "k_mean": k_mean,
            "host_tokens_mean": host,
            "keys_read": (_mean(r.keys_read_mean for r in reads) / host) if reads and host else None,
        }
    ref = table.get(reference)
    for row in table.values():
        row["gap_to_full"] = None if ref is None else row["overall"] - ref["overall"]
        row["gap_per_context"] = {n: (v - ref["average"][n]) if ref else None for n, v in row["average"].items()}
    return {"policies": policies, "contexts": contexts, "tasks": tasks, "table": table}


def _cell(v, fmt="{:.1f}"):
    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else fmt.format(v)


def markdown(summary: dict, host_readers: Sequence[str] = ()) -> str:
    """Per context a table (rows: policy; columns: the tasks, their average, the gap to ``full``,
    the keys read); then, with several contexts, the average per context and overall.
    ``host_readers``: the policies whose keys read are reported (those that read host memory)."""
    tasks, table, out = summary["tasks"], summary["table"], []
    for n in summary["contexts"]:
        out.append(f"Context {n} tokens: score × 100 (string_match_all, mean over the cases)\n")
        out.append("| policy | " + " | ".join(tasks) + " | average | gap to full | keys read |")
        out.append("|---|" + "---|" * (len(tasks) + 3))
        for p in summary["policies"]:
            row = table[p]
            keys = _cell(row["keys_read"], "{:.1%}") if p in host_readers else "—"
            cells = [_cell(row["scores"][str(n)][t]) for t in tasks]
            gap = _cell(row["gap_per_context"][str(n)], "{:+.1f}")
            out.append(f"| `{p}` | " + " | ".join(cells) + f" | {_cell(row['average'][str(n)])} | {gap} | {keys} |")
        out.append("")
    if len(summary["contexts"]) > 1:
        ns = summary["contexts"]
        out.append("Average over the tasks per context\n")
        out.append("| policy | " + " | ".join(map(str, ns)) + " | average | gap to full |")
        out.append("|---|" + "---|" * (len(ns) + 2))
        for p in summary["policies"]:
            row = table[p]
            cells = [_cell(row["average"][str(n)]) for n in ns]
            out.append(
                f"| `{p}` | "
                + " | ".join(cells)
                + f" | {_cell(row['overall'])} | {_cell(row['gap_to_full'], '{:+.1f}')} |"
            )
        out.append("")
    return "\n".join(out).rstrip()


def plot(summary: dict, path) -> bool:
    """Average score vs context per policy, saved to ``path`` (PNG); False (with a printed note)
    when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return False
    ns = summary["contexts"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for p in summary["policies"]:
        avg = summary["table"][p]["average"]
        ax.plot(ns, [avg[str(n)] for n in ns], marker="o", label=p, linestyle="--" if p == "full" else "-")
    ax.set_xscale("log", base=2)
    ax.set_xticks(ns, [str(n) for n in ns])
    ax.set_xlabel("context (tokens)")
    ax.set_ylabel("average score × 100")
    ax.set_title("RULER-style suite: average over tasks")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def as_rows(results: Sequence[RulerResult]) -> list[dict]:
    return [asdict(r) for r in results]
