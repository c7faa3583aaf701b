"""The demo run: corpus -> both models -> evaluation -> summary, metrics.json, loss.png.

:func:`run` is the entry point; ``_run`` strings the steps together, one
function each: the corpus and its vocabulary, the fixed validation sample, the
models, the checkpoint, training and evaluating each model, the h_softmax
model's predictions, and the report.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import os
import sys
import time
from typing import NamedTuple

import numpy as np

from blocksparse_jax.demo import _cli, _corpus


class DemoError(ValueError):
    """A problem with the options or the data: reported in one line, exit code 2."""


#: Validation tokens evaluated (a fixed sample, the same for both models), and
#: the chunk they are evaluated in.
EVAL_TOKENS, EVAL_CHUNK = 8192, 1024

#: Seed of the validation sample and of the prompts (fixed: the same for every ``--seed``).
EVAL_SEED = 12345

#: Token sequences whose next token the summary predicts, when the validation
#: split contains them (the standard library does); else random positions.
PROMPTS = (
    ("def", "__init__", "(", "self"),
    ("=", "self", "."),
    ("\n", "import"),
    ("\n", "for", "i", "in"),
    ("\n", "raise"),
    ("if", "__name__", "=="),
)
N_TOP_K_PROMPTS, N_SAMPLE_PROMPTS, TOP_K, SAMPLE_TOKENS = 4, 3, 5, 24

KIND_NAMES = {"hsoftmax": "h_softmax", "full": "full softmax"}


def run(args: argparse.Namespace) -> int:
    """Runs the demo with parsed options; returns the exit code (2 for a bad option or corpus)."""
    prog = "python -m blocksparse_jax demo"
    try:
        _run(args)
    except (DemoError, _corpus.CorpusError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        where = (
            f"; run again with --checkpoint {args.checkpoint} to resume" if args.checkpoint else ""
        )
        print(f"\n{prog}: interrupted{where}", file=sys.stderr)
        return 130
    return 0


def _run(args: argparse.Namespace) -> None:
    t_start = time.perf_counter()
    optax = _import_optax()
    import jax.numpy as jnp

    out_dir = _prepare_out(args.out)
    _check_checkpoint_path(args.checkpoint)
    corpus, t_corpus = _load_corpus(args)
    rng = np.random.default_rng(EVAL_SEED)
    val = _validation_sample(corpus, rng)
    models = _build_models(args, corpus, optax)
    checkpoint = _Checkpoint(args.checkpoint, _run_config(args, corpus, models))

    tokens = jnp.asarray(corpus.train)
    states, results = {}, {}
    for kind in models.kinds:
        states[kind] = _train_model(kind, args, models, checkpoint, states, tokens)
        results[kind] = _evaluate(states[kind], models.outputs[kind], val)
    predictions, samples = _predictions(corpus, states["hsoftmax"], models, rng)
    metrics = _metrics(
        args, corpus, t_corpus, models, val, states, results, predictions, samples, t_start
    )
    _write_report(out_dir, metrics)


# ---- set-up ---------------------------------------------------------------------------


def _import_optax():
    try:
        import optax
    except ImportError:
        raise DemoError(
            "the demo needs optax (and tqdm, matplotlib): "
            "python3 -m pip install 'blocksparse_jax[demo]'"
        ) from None
    return optax


def _prepare_out(path: str) -> str:
    if os.path.exists(path) and not os.path.isdir(path):
        raise DemoError(f"--out {path!r} exists and is not a folder")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise DemoError(f"--out {path!r}: cannot create the folder ({e.strerror})") from None
    return path


def _check_checkpoint_path(path: str | None) -> None:
    if path is None:
        return
    if os.path.isdir(path):
        raise DemoError(
            f"--checkpoint {path!r} is a folder; give a file path such as {path}/demo.npz"
        )
    parent = os.path.dirname(os.path.abspath(path))
    if os.path.exists(parent) and not os.path.isdir(parent):
        raise DemoError(f"--checkpoint {path!r}: {parent!r} is not a folder")


def _load_corpus(args: argparse.Namespace) -> tuple[_corpus.Corpus, float]:
    """The corpus and its vocabulary, checked for the model's needs; prints one line."""
    t0 = time.perf_counter()
    corpus = _corpus.load_corpus(args.text, vocab_size=args.vocab_size)
    seconds = time.perf_counter() - t0
    V, C = corpus.vocab_size, _cli.CONTEXT
    if V < _cli.MIN_VOCAB:
        how = (
            "--vocab-size"
            if args.vocab_size
            else "tokens seen at least twice in the training split"
        )
        raise DemoError(
            f"the vocabulary has {V} entries ({how}, <unk> included); the hierarchical softmax "
            f"needs at least {_cli.MIN_VOCAB} (two classes of two tokens): give a larger text"
        )
    for name, split in (("training", corpus.train), ("validation", corpus.val)):
        if len(split) <= C:
            raise DemoError(
                f"the {name} split has {len(split)} tokens; the model needs more than {C} "
                f"(it predicts each token from the {C} before it): give a larger text"
            )
    skipped = (
        f"; skipped {corpus.n_skipped} files that are not UTF-8 text" if corpus.n_skipped else ""
    )
    print(
        f"corpus: {corpus.source}: {corpus.n_files:,} files, {len(corpus.train):,} training and "
        f"{len(corpus.val):,} validation tokens (split {corpus.split}), "
        f"{corpus.n_distinct:,} distinct, vocabulary {V:,} [{seconds:.1f} s]{skipped}",
        flush=True,
    )
    return corpus, seconds


class _ValSample(NamedTuple):
    """The fixed validation sample both models are evaluated on."""

    x: np.ndarray  # (n_eval, context) preceding tokens
    y: np.ndarray  # (n_eval,) targets
    chunk: int
    n_eval: int  # tokens evaluated: a multiple of ``chunk``
    unigram_ppl: float


def _validation_sample(corpus: _corpus.Corpus, rng: np.random.Generator) -> _ValSample:
    C = _cli.CONTEXT
    n_eval = min(EVAL_TOKENS, len(corpus.val) - C)
    positions = np.sort(rng.choice(np.arange(C, len(corpus.val)), n_eval, replace=False))
    x = corpus.val[positions[:, None] + np.arange(-C, 0)]
    y = corpus.val[positions]
    chunk = min(EVAL_CHUNK, n_eval)
    n_eval = (n_eval // chunk) * chunk
    unigram_ppl = math.exp(-float(np.mean(_corpus.unigram_log_probs(corpus.counts)[y[:n_eval]])))
    return _ValSample(x, y, chunk, n_eval, unigram_ppl)


class _Models(NamedTuple):
    """Everything both models are built and trained from."""

    cfg: object  # _model.ModelConfig
    layout: object  # HSoftmaxLayout
    optimizer: object  # optax.GradientTransformation
    outputs: dict  # kind -> _model.Output
    kinds: list[str]  # the kinds trained, h_softmax first
    key_data: object
    key_init: object
    key_sample: object


def _build_models(args: argparse.Namespace, corpus: _corpus.Corpus, optax) -> _Models:
    import jax

    from blocksparse_jax import frequency_classes
    from blocksparse_jax.demo import _model

    V = corpus.vocab_size
    # Classes of at most ceil(V / n_classes) tokens: frequency binning with a bounded
    # second level, so that W2 is no larger than the full softmax's weight matrix.
    n_classes = math.isqrt(V - 1) + 1
    layout = frequency_classes(
        corpus.counts, n_classes, max_class_size=-(-V // n_classes) * _cli.CLASS_SIZE_FACTOR
    )
    key_data, key_init, key_sample = jax.random.split(jax.random.key(args.seed), 3)
    return _Models(
        cfg=_model.ModelConfig(V, _cli.CONTEXT, _cli.EMBED, _cli.HIDDEN),
        layout=layout,
        optimizer=optax.adam(_cli.LEARNING_RATE),
        outputs={"hsoftmax": _model.Output.hsoftmax(layout), "full": _model.Output("full")},
        kinds=["hsoftmax"] + ([] if args.no_baseline else ["full"]),
        key_data=key_data,
        key_init=key_init,
        key_sample=key_sample,
    )


def _run_config(args: argparse.Namespace, corpus: _corpus.Corpus, models: _Models) -> dict:
    """What a checkpoint must have been written with to be resumed by this run."""
    return {
        "vocab_size": corpus.vocab_size,
        "vocab_sha1": hashlib.sha1("\0".join(corpus.vocab).encode("utf-8", "replace")).hexdigest(),
        "train_tokens": len(corpus.train),
        "context": _cli.CONTEXT,
        "embed": _cli.EMBED,
        "hidden": _cli.HIDDEN,
        "learning_rate": _cli.LEARNING_RATE,
        "batch_size": args.batch_size,
        "seed": args.seed,
        "n_classes": models.layout.n_classes,
        "n_outputs_per_class": models.layout.n_outputs_per_class,
    }


# ---- checkpointing --------------------------------------------------------------------


class _Checkpoint:
    """The ``--checkpoint`` file: what it held when the run started, and saving."""

    def __init__(self, path: str | None, config: dict):
        from blocksparse_jax.demo import _train

        self.path, self.config = path, config
        self.header, self.leaves = {"models": {}}, {}
        if path and os.path.exists(path):
            try:
                self.header, self.leaves = _train.load_checkpoint(path, config)
            except _train.CheckpointError as e:
                raise DemoError(str(e)) from None
            at = ", ".join(f"{k} at step {m['step']}" for k, m in self.header["models"].items())
            print(f"resuming from {path}: {at}", flush=True)

    def restore(self, kind: str, fresh):
        """``fresh`` (a ``ModelState``) with the saved state of ``kind``, when there is one."""
        from blocksparse_jax.demo import _train

        if kind not in self.leaves:
            return fresh
        try:
            return _train.restore(fresh, self.leaves[kind], self.header["models"][kind])
        except _train.CheckpointError as e:
            raise DemoError(f"--checkpoint {self.path!r}: {e}") from None

    def save(self, states: dict) -> None:
        """Writes ``states``; the loaded models not in ``states`` are kept as they were."""
        from blocksparse_jax.demo import _train

        kept = {
            kind: (leaves, self.header["models"][kind])
            for kind, leaves in self.leaves.items()
            if kind not in states
        }
        _train.save_checkpoint(self.path, self.config, states, kept)


# ---- training and evaluation ----------------------------------------------------------


def _train_model(kind, args, models: _Models, checkpoint: _Checkpoint, states: dict, tokens):
    """Builds (or restores) one model and trains it to ``--steps``; adds it to ``states``."""
    from blocksparse_jax.demo import _model, _train

    params = _model.init_params(models.key_init, models.cfg, kind, models.layout)
    state = checkpoint.restore(kind, _train.ModelState(params, models.optimizer.init(params)))
    states[kind] = state
    if state.step >= args.steps:
        print(f"{kind}: already at step {state.step} (from the checkpoint)", flush=True)
    step_fn = _train.make_train_step(
        models.optimizer,
        models.outputs[kind],
        context=_cli.CONTEXT,
        batch_size=args.batch_size,
        key=models.key_data,
    )
    _train.train(
        state,
        step_fn,
        tokens,
        steps=args.steps,
        batch_size=args.batch_size,
        desc=KIND_NAMES[kind],
        save=(lambda: checkpoint.save(states)) if args.checkpoint else None,
    )
    return state


def _evaluate(state, output, val: _ValSample) -> dict:
    """The validation perplexity of one model, and the seconds it took."""
    from blocksparse_jax.demo import _train

    t0 = time.perf_counter()
    evaluate = _train.make_evaluator(output, val.x, val.y, val.chunk)
    return {"val_ppl": math.exp(evaluate(state.params)), "eval_s": time.perf_counter() - t0}


# ---- what the h_softmax model predicts ------------------------------------------------


def _find_prompts(corpus: _corpus.Corpus, context: int, rng: np.random.Generator) -> np.ndarray:
    """Positions in the validation split to predict from: after each of ``PROMPTS``, else random."""
    val = corpus.val
    found = []
    for words in PROMPTS:
        ids = corpus.encode(list(words))
        if len(val) <= context or np.any(ids == 0):
            continue
        L = len(ids)
        hit = np.ones(len(val) - L + 1, bool)
        for j, w in enumerate(ids):
            hit &= val[j : len(val) - L + 1 + j] == w
        ends = np.flatnonzero(hit) + L
        ends = ends[(ends >= context) & (ends < len(val))]
        if len(ends):
            found.append(int(ends[0]))
    if len(found) < N_TOP_K_PROMPTS and len(val) > context:
        extra = rng.choice(np.arange(context, len(val)), N_TOP_K_PROMPTS - len(found))
        found.extend(int(p) for p in extra)
    return np.array(found, dtype=np.int64)


def _predictions(corpus: _corpus.Corpus, hs, models: _Models, rng: np.random.Generator):
    """The top-k next tokens after the first prompts, and sampled continuations of others."""
    import jax
    import jax.numpy as jnp

    from blocksparse_jax.demo import _model

    C, out_hs = _cli.CONTEXT, models.outputs["hsoftmax"]
    prompt_pos = _find_prompts(corpus, C, rng)
    prompt_ctx = corpus.val[prompt_pos[:, None] + np.arange(-C, 0)]
    top_pos, top_ctx = prompt_pos[:N_TOP_K_PROMPTS], prompt_ctx[:N_TOP_K_PROMPTS]
    top = jax.jit(lambda params, ctx: _model.top_k(params, out_hs, ctx, TOP_K))
    logp, ids = top(hs.params, jnp.asarray(top_ctx))
    predictions = [
        {
            "context": [corpus.vocab[t] for t in ctx],
            "actual": corpus.vocab[corpus.val[p]],
            "top": [
                (corpus.vocab[int(i)], float(np.exp(lp))) for lp, i in zip(lrow, irow, strict=True)
            ],
        }
        for ctx, p, lrow, irow in zip(
            top_ctx, top_pos, np.asarray(logp), np.asarray(ids), strict=True
        )
    ]

    def generate(params, contexts, key):
        def body(ctx, k):
            nxt = _model.sample(k, params, out_hs, ctx)
            return jnp.concatenate([ctx[:, 1:], nxt[:, None]], axis=1), nxt

        _, new = jax.lax.scan(body, contexts, jax.random.split(key, SAMPLE_TOKENS))
        return new.T

    sample_ctx = prompt_ctx[:N_SAMPLE_PROMPTS]
    new = np.asarray(jax.jit(generate)(hs.params, jnp.asarray(sample_ctx), models.key_sample))
    samples = [
        {"context": [corpus.vocab[t] for t in ctx], "sample": [corpus.vocab[t] for t in row]}
        for ctx, row in zip(sample_ctx, new, strict=True)
    ]
    return predictions, samples


# ---- report ---------------------------------------------------------------------------


def _metrics(
    args,
    corpus,
    t_corpus,
    models: _Models,
    val: _ValSample,
    states,
    results,
    predictions,
    samples,
    t_start,
) -> dict:
    """Everything ``metrics.json`` holds (the summary and the plot are drawn from it)."""
    import jax

    hs, full = states["hsoftmax"], states.get("full")
    tps_hs, tps_full = hs.tokens_per_s, full.tokens_per_s if full else None
    return {
        "vocab_size": corpus.vocab_size,
        "steps": hs.step,
        "steps_full": full.step if full else None,
        "batch_size": args.batch_size,
        "tokens_per_s_hsoftmax": tps_hs,
        "tokens_per_s_full": tps_full,
        "speedup": tps_hs / tps_full if tps_hs and tps_full else None,
        "val_ppl_hsoftmax": results["hsoftmax"]["val_ppl"],
        "val_ppl_full": results["full"]["val_ppl"] if full else None,
        "val_ppl_unigram": val.unigram_ppl,
        "val_eval_tokens": val.n_eval,
        "compile_s_hsoftmax": hs.compile_seconds,
        "compile_s_full": full.compile_seconds if full else None,
        "corpus": corpus.source,
        "corpus_files": corpus.n_files,
        "corpus_split": corpus.split,
        "train_tokens": len(corpus.train),
        "val_tokens": len(corpus.val),
        "distinct_tokens": corpus.n_distinct,
        "tokenize_s": t_corpus,
        "model": {
            "context": _cli.CONTEXT,
            "embed": _cli.EMBED,
            "hidden": _cli.HIDDEN,
            "optimizer": f"adam({_cli.LEARNING_RATE})",
            "n_classes": models.layout.n_classes,
            "n_outputs_per_class": models.layout.n_outputs_per_class,
        },
        "seed": args.seed,
        "jax_version": jax.__version__,
        "backend": jax.default_backend(),
        "devices": jax.device_count(),
        "top5": predictions,
        "samples": samples,
        "loss_hsoftmax": hs.losses,
        "loss_full": full.losses if full else None,
        "wall_s": time.perf_counter() - t_start,
    }


def _write_report(out_dir: str, metrics: dict) -> None:
    """Prints the summary and writes ``metrics.json``, ``summary.txt`` and ``loss.png``."""
    from blocksparse_jax.demo import _report

    print(_report.summary(metrics), flush=True)
    plot = _report.write_outputs(out_dir, metrics)
    print(f"wrote {os.path.join(out_dir, 'metrics.json')}" + (f" and {plot}" if plot else ""))
