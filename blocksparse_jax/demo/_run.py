"""The demo run: corpus -> the models -> evaluation -> summary, metrics.json, loss.png.

:func:`run` is the entry point; ``_run`` strings the steps together, one
function each: the corpus and its vocabulary, the fixed validation sample, the
models (the ``--output`` head's, and the exact softmax's as the baseline), the
checkpoint, training and evaluating each model, the ``--output`` model's
predictions, and the report.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import math
import os
import signal
import sys
import tempfile
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

KIND_NAMES = {
    "hsoftmax": "h_softmax",
    "full": "full softmax",
    "naive": "naive softmax",
    "filtered": "filtered softmax",
    "sampled": "sampled softmax",
    "adaptive": "adaptive softmax",
}


def run(args: argparse.Namespace) -> int:
    """Runs the demo with parsed options; returns the exit code.

    A problem the user can fix (an option, the corpus, a checkpoint, a folder
    that cannot be written, memory) is one line on stderr and exit code 2.
    SIGINT and SIGTERM stop the run with the checkpoint saved (exit code 130
    and 143).
    """
    from blocksparse_jax.demo import _interrupts

    prog = "python -m blocksparse_jax demo"
    progress: dict = {}  # what the checkpoint holds, for the interrupt message
    try:
        with _interrupts.Interrupts() as interrupts:
            _run(args, progress, interrupts)
    except KeyboardInterrupt as e:
        signum = getattr(e, "signum", signal.SIGINT)
        print(f"\n{prog}: {_interrupted(args, progress, signum)}", file=sys.stderr)
        return 128 + signum
    except Exception as e:
        message = _user_error(e)
        if message is None:
            raise
        print(f"{prog}: error: {message}", file=sys.stderr)
        return 2
    return 0


def _user_error(e: Exception) -> str | None:
    """The one-line message of an error the user can fix, or None for a bug."""
    from blocksparse_jax.demo import _checkpoint, _train

    if isinstance(
        e, (DemoError, _corpus.CorpusError, _checkpoint.CheckpointError, _train.ResourceError)
    ):
        return str(e)
    if isinstance(e, MemoryError) or (
        isinstance(e, RuntimeError) and "RESOURCE_EXHAUSTED" in str(e)
    ):
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return (
            f"out of memory ({first}); use a smaller --batch-size, or a smaller "
            "--vocab-size or --text"
        )
    return None


def _interrupted(args: argparse.Namespace, progress: dict, signum: int) -> str:
    name = signal.Signals(signum).name
    if not args.checkpoint:
        return f"interrupted ({name}); nothing saved (give --checkpoint PATH to be able to resume)"
    if not progress:
        return f"interrupted ({name}); nothing was saved to --checkpoint {args.checkpoint} yet"
    at = ", ".join(f"{KIND_NAMES[k]} at step {step}" for k, step in progress.items())
    return (
        f"interrupted ({name}); --checkpoint {args.checkpoint} holds {at}: "
        "run the same command again to resume"
    )


def _run(args: argparse.Namespace, progress: dict, interrupts) -> None:
    """The run, phase by phase; ``interrupts.check()`` between phases raises a signal that
    arrived where it could not be raised (see ``_interrupts.Interrupts``)."""
    t_start = time.perf_counter()
    optax = _import_optax()
    import jax.numpy as jnp

    out_dir = _prepare_out(args.out)
    _check_checkpoint_path(args.checkpoint)
    corpus, t_corpus = _load_corpus(args)
    interrupts.check()
    rng = np.random.default_rng(EVAL_SEED)
    val = _validation_sample(corpus, rng)
    models = _build_models(args, corpus, optax)
    checkpoint = _Checkpoint(args.checkpoint, _run_config(args, corpus, models), progress)
    interrupts.check()

    tokens = jnp.asarray(corpus.train)
    states, results = {}, {}
    for kind in models.kinds:
        states[kind] = _train_model(kind, args, models, checkpoint, states, tokens, interrupts)
        results[kind] = _evaluate(states[kind], models.outputs[kind], val)
        interrupts.check()
    predictions, samples = _predictions(corpus, states[args.output], args.output, models, rng)
    metrics = _metrics(
        args, corpus, t_corpus, models, val, states, results, predictions, samples, t_start
    )
    interrupts.check()
    with interrupts.deferred():  # whole files: a signal waits until they are written
        _write_report(out_dir, metrics)
    interrupts.check()


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
    _check_writable(path, f"--out {path!r}")
    return path


def _check_writable(folder: str, where: str) -> None:
    """Creates and removes a file in ``folder``, so that a folder we cannot write fails now."""
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".blocksparse-demo-", suffix=".tmp")
    except OSError as e:
        raise DemoError(f"{where}: cannot write in {folder!r} ({e.strerror})") from None
    try:
        os.close(fd)
    finally:
        os.unlink(probe)


def _check_checkpoint_path(path: str | None) -> None:
    if path is None:
        return
    if os.path.isdir(path):
        raise DemoError(
            f"--checkpoint {path!r} is a folder; give a file path such as {path}/demo.npz"
        )
    if os.path.lexists(path) and not os.path.isfile(path):
        raise DemoError(
            f"--checkpoint {path!r} is not a regular file (a device, pipe, socket or broken "
            "link); give another path"
        )
    parent = os.path.dirname(os.path.abspath(path))
    if os.path.exists(parent) and not os.path.isdir(parent):
        raise DemoError(f"--checkpoint {path!r}: {parent!r} is not a folder")
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as e:
        raise DemoError(
            f"--checkpoint {path!r}: cannot create the folder {parent!r} ({e.strerror})"
        ) from None
    _check_writable(parent, f"--checkpoint {path!r}")


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
    optimizer: object  # optax.GradientTransformation: lazy(adam)
    outputs: dict  # kind -> _model.Output
    layouts: dict  # kind -> the head's layout (HSoftmaxLayout, AdaptiveSoftmaxLayout) or None
    kinds: list[str]  # the kinds trained, the --output head first
    key_data: object
    key_init: object
    key_sample: object


def _build_models(args: argparse.Namespace, corpus: _corpus.Corpus, optax) -> _Models:
    import jax

    from blocksparse_jax import frequency_classes
    from blocksparse_jax.demo import _model, _train
    from blocksparse_jax.optim import lazy

    V = corpus.vocab_size
    # Classes of at most ceil(V / n_classes) tokens: frequency binning with a bounded
    # second level, so that W2 is no larger than the full softmax's weight matrix.
    n_classes = math.isqrt(V - 1) + 1
    layout = frequency_classes(
        corpus.counts, n_classes, max_class_size=-(-V // n_classes) * _cli.CLASS_SIZE_FACTOR
    )
    key_data, key_init, key_sample = jax.random.split(_train.seed_key(args.seed), 3)
    kinds = [args.output] + ([] if args.no_baseline or args.output == "full" else ["full"])
    layouts = dict.fromkeys(_model.KINDS)
    layouts["hsoftmax"] = layout
    outputs = {kind: _model.Output(kind) for kind in _model.KINDS}
    outputs["hsoftmax"] = _model.Output.hsoftmax(layout)
    outputs["sampled"] = _model.Output.sampled(corpus.counts)
    if "adaptive" in kinds:
        layouts["adaptive"] = _model.adaptive_layout(corpus.counts, _cli.HIDDEN)
        outputs["adaptive"] = _model.Output.adaptive(layouts["adaptive"])
    return _Models(
        cfg=_model.ModelConfig(V, _cli.CONTEXT, _cli.EMBED, _cli.HIDDEN),
        layout=layout,
        # The vocabulary-sized parameters (the embeddings; W2 and b2 of the h_softmax)
        # get sparse gradients and lazy Adam updates; the others dense Adam.
        optimizer=lazy(optax.adam(_cli.LEARNING_RATE)),
        outputs=outputs,
        layouts=layouts,
        kinds=kinds,
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
        # the moments of lazy and dense Adam differ: a checkpoint of one does not resume the other
        "optimizer": "lazy(adam)",
        "batch_size": args.batch_size,
        "seed": args.seed,
        "n_classes": models.layout.n_classes,
        "n_outputs_per_class": models.layout.n_outputs_per_class,
    }


# ---- checkpointing --------------------------------------------------------------------


class _Checkpoint:
    """The ``--checkpoint`` file: what it held when the run started, and saving.

    ``progress`` (kind -> step) says what the file holds, for the interrupt message.
    """

    def __init__(self, path: str | None, config: dict, progress: dict):
        from blocksparse_jax.demo import _checkpoint

        self.path, self.config, self.progress = path, config, progress
        self.header, self.leaves = {"models": {}}, {}
        if path and os.path.exists(path):
            self.header, self.leaves = _checkpoint.load_checkpoint(path, config)
            self.progress.update((k, m["step"]) for k, m in self.header["models"].items())
            at = ", ".join(f"{k} at step {m['step']}" for k, m in self.header["models"].items())
            print(f"resuming from {path}: {at}", flush=True)

    def restore(self, kind: str, fresh):
        """``fresh`` (a ``ModelState``) with the saved state of ``kind``, when there is one."""
        from blocksparse_jax.demo import _checkpoint

        if kind not in self.leaves:
            return fresh
        try:
            return _checkpoint.restore(fresh, self.leaves[kind], self.header["models"][kind])
        except _checkpoint.CheckpointError as e:
            raise DemoError(f"--checkpoint {self.path!r}: {e}") from None

    def save(self, states: dict) -> None:
        """Writes ``states``; the loaded models not in ``states`` are kept as they were."""
        from blocksparse_jax.demo import _checkpoint

        kept = {
            kind: (leaves, self.header["models"][kind])
            for kind, leaves in self.leaves.items()
            if kind not in states
        }
        _checkpoint.save_checkpoint(self.path, self.config, states, kept)
        self.progress.update((k, st.step) for k, st in states.items())


# ---- training and evaluation ----------------------------------------------------------


def _train_model(
    kind, args, models: _Models, checkpoint: _Checkpoint, states: dict, tokens, interrupts
):
    """Builds (or restores) one model and trains it to ``--steps``; adds it to ``states``."""
    from blocksparse_jax.demo import _model, _train

    params = _model.init_params(models.key_init, models.cfg, kind, models.layouts[kind])
    state = checkpoint.restore(kind, _train.ModelState(params, models.optimizer.init(params)))
    states[kind] = state
    if state.step >= args.steps:
        print(f"{kind}: already at step {state.step} (from the checkpoint)", flush=True)
    make_step = functools.partial(
        _train.make_train_step,
        models.optimizer,
        models.outputs[kind],
        context=_cli.CONTEXT,
        key=models.key_data,
    )
    _train.train(
        state,
        lambda batch_size: make_step(batch_size=batch_size),
        tokens,
        steps=args.steps,
        batch_size=args.batch_size,
        desc=KIND_NAMES[kind],
        save=(lambda: checkpoint.save(states)) if args.checkpoint else None,
        interrupts=interrupts,
    )
    return state


def _evaluate(state, output, val: _ValSample) -> dict:
    """The validation perplexity of one model, and the seconds it took."""
    from blocksparse_jax.demo import _train

    t0 = time.perf_counter()
    evaluate = _train.make_evaluator(output, val.x, val.y, val.chunk)
    return {"val_ppl": math.exp(evaluate(state.params)), "eval_s": time.perf_counter() - t0}


# ---- what the --output model predicts --------------------------------------------------


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


def _predictions(corpus: _corpus.Corpus, hs, kind: str, models: _Models, rng: np.random.Generator):
    """The top-k next tokens after the first prompts, and sampled continuations of others."""
    import jax
    import jax.numpy as jnp

    from blocksparse_jax.demo import _model

    C, out_hs = _cli.CONTEXT, models.outputs[kind]
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

    kind = args.output
    model = states[kind]
    full = states.get("full") if kind != "full" else None
    tps_model, tps_full = model.tokens_per_s, full.tokens_per_s if full else None
    return {
        "output": kind,
        "vocab_size": corpus.vocab_size,
        "steps": model.step,
        "steps_full": full.step if full else None,
        "batch_size": args.batch_size,
        f"tokens_per_s_{kind}": tps_model,
        "tokens_per_s_full": tps_full if kind != "full" else tps_model,
        "speedup": tps_model / tps_full if tps_model and tps_full else None,
        f"val_ppl_{kind}": results[kind]["val_ppl"],
        "val_ppl_full": results["full"]["val_ppl"] if "full" in results else None,
        "val_ppl_unigram": val.unigram_ppl,
        "val_eval_tokens": val.n_eval,
        f"compile_s_{kind}": model.compile_seconds,
        "compile_s_full": states["full"].compile_seconds if "full" in states else None,
        f"touched_{kind}": model.touched,
        "touched_full": states["full"].touched if "full" in states else None,
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
            "optimizer": f"lazy(adam({_cli.LEARNING_RATE}))",
            "n_classes": models.layout.n_classes,
            "n_outputs_per_class": models.layout.n_outputs_per_class,
        },
        "seed": args.seed,
        "jax_version": jax.__version__,
        "backend": jax.default_backend(),
        "devices": jax.device_count(),
        "top5": predictions,
        "samples": samples,
        f"loss_{kind}": model.losses,
        "loss_full": states["full"].losses if "full" in states else None,
        "wall_s": time.perf_counter() - t_start,
    }


def _write_report(out_dir: str, metrics: dict) -> None:
    """Prints the summary and writes ``metrics.json``, ``summary.txt`` and ``loss.png``."""
    from blocksparse_jax.demo import _report

    print(_report.summary(metrics), flush=True)
    try:
        plot = _report.write_outputs(out_dir, metrics)
    except OSError as e:
        raise DemoError(
            f"--out {out_dir!r}: cannot write {os.path.basename(e.filename or '') or 'the results'}"
            f" ({e.strerror or e})"
        ) from None
    written = [os.path.join(out_dir, name) for name in ("metrics.json", "summary.txt")]
    written += [plot] if plot else []
    print(f"wrote {', '.join(written[:-1])} and {written[-1]}")
