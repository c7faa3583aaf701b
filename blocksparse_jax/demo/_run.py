"""The demo run: corpus -> both models -> evaluation -> summary, metrics.json, loss.png."""

from __future__ import annotations

import argparse
import hashlib
import math
import os
import sys
import time

import numpy as np

from blocksparse_jax.demo import _cli, _corpus


class DemoError(ValueError):
    """A problem with the options or the data: reported in one line, exit code 2."""


#: Validation tokens evaluated (a fixed sample, the same for both models), and
#: the chunk they are evaluated in.
EVAL_TOKENS, EVAL_CHUNK = 8192, 1024

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


def _run(args: argparse.Namespace) -> None:
    t_start = time.perf_counter()
    try:
        import optax
    except ImportError:
        raise DemoError(
            "the demo needs optax (and tqdm, matplotlib): "
            "python3 -m pip install 'blocksparse_jax[demo]'"
        ) from None
    import jax
    import jax.numpy as jnp

    from blocksparse_jax import frequency_classes
    from blocksparse_jax.demo import _model, _report, _train

    out_dir = _prepare_out(args.out)
    _check_checkpoint_path(args.checkpoint)
    C = _cli.CONTEXT

    # ---- corpus -----------------------------------------------------------------------
    t0 = time.perf_counter()
    corpus = _corpus.load_corpus(args.text, vocab_size=args.vocab_size)
    t_corpus = time.perf_counter() - t0
    V = corpus.vocab_size
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
    print(
        f"corpus: {corpus.source}: {corpus.n_files:,} files, {len(corpus.train):,} training and "
        f"{len(corpus.val):,} validation tokens (split {corpus.split}), "
        f"{corpus.n_distinct:,} distinct, vocabulary {V:,} [{t_corpus:.1f} s]"
        + (
            f"; skipped {corpus.n_skipped} files that are not UTF-8 text"
            if corpus.n_skipped
            else ""
        ),
        flush=True,
    )

    # Classes of at most ceil(V / n_classes) tokens: frequency binning with a bounded
    # second level, so that W2 is no larger than the full softmax's weight matrix.
    n_classes = math.isqrt(V - 1) + 1
    layout = frequency_classes(
        corpus.counts, n_classes, max_class_size=-(-V // n_classes) * _cli.CLASS_SIZE_FACTOR
    )
    cfg = _model.ModelConfig(V, C, _cli.EMBED, _cli.HIDDEN)
    key_data, key_init, key_sample = jax.random.split(jax.random.key(args.seed), 3)
    optimizer = optax.adam(_cli.LEARNING_RATE)
    outputs = {
        "hsoftmax": _model.Output.hsoftmax(layout),
        "full": _model.Output("full"),
    }
    kinds = ["hsoftmax"] + ([] if args.no_baseline else ["full"])

    # ---- the fixed validation sample ---------------------------------------------------
    rng = np.random.default_rng(12345)
    n_eval = min(EVAL_TOKENS, len(corpus.val) - C)
    positions = np.sort(rng.choice(np.arange(C, len(corpus.val)), n_eval, replace=False))
    val_x = corpus.val[positions[:, None] + np.arange(-C, 0)]
    val_y = corpus.val[positions]
    chunk = min(EVAL_CHUNK, n_eval)
    n_eval = (n_eval // chunk) * chunk
    unigram_ppl = math.exp(
        -float(np.mean(_corpus.unigram_log_probs(corpus.counts)[val_y[:n_eval]]))
    )

    # ---- checkpoint --------------------------------------------------------------------
    run_config = {
        "vocab_size": V,
        "vocab_sha1": hashlib.sha1("\0".join(corpus.vocab).encode("utf-8", "replace")).hexdigest(),
        "train_tokens": len(corpus.train),
        "context": C,
        "embed": _cli.EMBED,
        "hidden": _cli.HIDDEN,
        "learning_rate": _cli.LEARNING_RATE,
        "batch_size": args.batch_size,
        "seed": args.seed,
        "n_classes": layout.n_classes,
        "n_outputs_per_class": layout.n_outputs_per_class,
    }
    saved_header, saved_leaves = {"models": {}}, {}
    if args.checkpoint and os.path.exists(args.checkpoint):
        try:
            saved_header, saved_leaves = _train.load_checkpoint(args.checkpoint, run_config)
        except _train.CheckpointError as e:
            raise DemoError(str(e)) from None
        steps_there = ", ".join(
            f"{k} at step {m['step']}" for k, m in saved_header["models"].items()
        )
        print(f"resuming from {args.checkpoint}: {steps_there}", flush=True)

    states: dict[str, _train.ModelState] = {}

    def save():
        if args.checkpoint:
            kept = {
                kind: (leaves, saved_header["models"][kind])
                for kind, leaves in saved_leaves.items()
                if kind not in states
            }
            _train.save_checkpoint(args.checkpoint, run_config, states, kept)

    tokens = jnp.asarray(corpus.train)
    results = {}
    for kind in kinds:
        params = _model.init_params(key_init, cfg, kind, layout)
        state = _train.ModelState(params, optimizer.init(params))
        if kind in saved_leaves:
            try:
                state = _train.restore(state, saved_leaves[kind], saved_header["models"][kind])
            except _train.CheckpointError as e:
                raise DemoError(f"--checkpoint {args.checkpoint!r}: {e}") from None
        states[kind] = state
        if state.step >= args.steps:
            print(f"{kind}: already at step {state.step} (from the checkpoint)", flush=True)
        step_fn = _train.make_train_step(
            optimizer, outputs[kind], context=C, batch_size=args.batch_size, key=key_data
        )
        desc = "h_softmax" if kind == "hsoftmax" else "full softmax"
        _train.train(
            state,
            step_fn,
            tokens,
            steps=args.steps,
            batch_size=args.batch_size,
            desc=desc,
            save=save if args.checkpoint else None,
        )
        t0 = time.perf_counter()
        evaluate = _train.make_evaluator(outputs[kind], val_x, val_y, chunk)
        results[kind] = {
            "val_ppl": math.exp(evaluate(state.params)),
            "eval_s": time.perf_counter() - t0,
        }

    # ---- what the h_softmax model predicts -------------------------------------------
    hs, out_hs = states["hsoftmax"], outputs["hsoftmax"]
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
    new = np.asarray(jax.jit(generate)(hs.params, jnp.asarray(sample_ctx), key_sample))
    samples = [
        {"context": [corpus.vocab[t] for t in ctx], "sample": [corpus.vocab[t] for t in row]}
        for ctx, row in zip(sample_ctx, new, strict=True)
    ]

    # ---- report ------------------------------------------------------------------------
    full = states.get("full")
    tps_hs, tps_full = hs.tokens_per_s, full.tokens_per_s if full else None
    metrics = {
        "vocab_size": V,
        "steps": hs.step,
        "steps_full": full.step if full else None,
        "batch_size": args.batch_size,
        "tokens_per_s_hsoftmax": tps_hs,
        "tokens_per_s_full": tps_full,
        "speedup": tps_hs / tps_full if tps_hs and tps_full else None,
        "val_ppl_hsoftmax": results["hsoftmax"]["val_ppl"],
        "val_ppl_full": results["full"]["val_ppl"] if full else None,
        "val_ppl_unigram": unigram_ppl,
        "val_eval_tokens": n_eval,
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
            "context": C,
            "embed": _cli.EMBED,
            "hidden": _cli.HIDDEN,
            "optimizer": f"adam({_cli.LEARNING_RATE})",
            "n_classes": layout.n_classes,
            "n_outputs_per_class": layout.n_outputs_per_class,
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
    print(_report.summary(metrics), flush=True)
    plot = _report.write_outputs(out_dir, metrics)
    print(f"wrote {os.path.join(out_dir, 'metrics.json')}" + (f" and {plot}" if plot else ""))
