"""The demo's options."""

from __future__ import annotations

import argparse

SUMMARY = "train a large-vocabulary language model with h_softmax (and a full-softmax baseline)"

#: Default sizes of the run: a few minutes on a CPU, compilation included.
DEFAULTS = {
    "steps": 600,
    "batch_size": 128,
    "seed": 0,
    "out": "blocksparse_demo",
    "output": "hsoftmax",
}

#: The output layers ``--output`` picks from (see ``_model``).
OUTPUTS = ("hsoftmax", "full", "naive", "filtered", "sampled", "adaptive")

#: Model sizes (not options: the demo's point is the output layer).
CONTEXT, EMBED, HIDDEN, LEARNING_RATE = 4, 64, 64, 5e-3

#: The largest h_softmax class, in units of an even split of the vocabulary.
CLASS_SIZE_FACTOR = 1

#: The hierarchical softmax needs two classes, each with a real choice to make.
MIN_VOCAB = 4

DESCRIPTION = f"""\
{SUMMARY}.

The corpus is the Python standard library's own source (without its test
suites), tokenized into identifiers, numbers, operators, symbols and newlines;
every tenth file is held out for validation.  The model sees the previous
{CONTEXT} tokens (embedded and concatenated, one tanh hidden layer of
{HIDDEN}) and predicts the next with a two-level hierarchical softmax whose
classes come from frequency_classes, trained with h_softmax_loss and lazy Adam
(the embeddings, W2 and b2 are updated on the blocks a step touches only).  The
same model with the exact softmax over the whole vocabulary (logits-free) is
the baseline; --output trains another output layer instead of h_softmax.
Results go to OUT: metrics.json and loss.png (when matplotlib is installed).
"""


#: Largest --steps and --batch-size: steps and token positions are int32 on the device.
MAX_INT32 = 2**31 - 1


def _int_in(lo: int, hi: int | None, below: str, above: str = ""):
    """An argparse type: an integer in ``[lo, hi]``; ``below`` / ``above`` say what is wrong."""

    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            shown = text if len(text) <= 40 else text[:37] + "..."
            raise argparse.ArgumentTypeError(f"expected an integer, got {shown!r}") from None
        if v < lo:
            raise argparse.ArgumentTypeError(f"{below}, got {v}")
        if hi is not None and v > hi:
            raise argparse.ArgumentTypeError(f"{above}, got {v}")
        return v

    return parse


def _path(text: str) -> str:
    if not text:
        raise argparse.ArgumentTypeError("expected a path, got an empty string")
    return text


_POSITIVE_INT32 = ("must be a positive integer", f"must be at most {MAX_INT32:,} (int32)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the demo's options to ``parser``."""
    parser.add_argument(
        "--text",
        type=_path,
        metavar="PATH",
        help="a UTF-8 text file, or a folder of them, to train on instead of the standard library",
    )
    parser.add_argument(
        "--vocab-size",
        type=_int_in(MIN_VOCAB, None, f"must be at least {MIN_VOCAB} (two classes of two tokens)"),
        metavar="N",
        help="keep the N-1 most frequent training tokens plus <unk> "
        "(default: every token seen at least twice)",
    )
    parser.add_argument(
        "--steps",
        type=_int_in(1, MAX_INT32, *_POSITIVE_INT32),
        default=DEFAULTS["steps"],
        metavar="N",
        help="training steps of each model (default: %(default)s)",
    )
    parser.add_argument(
        "--batch-size",
        type=_int_in(1, MAX_INT32, *_POSITIVE_INT32),
        default=DEFAULTS["batch_size"],
        metavar="N",
        help="tokens per training step (default: %(default)s)",
    )
    parser.add_argument(
        "--seed",
        type=_int_in(
            0, 2**64 - 1, "must be a non-negative integer", "must be less than 2**64 (64 bits)"
        ),
        default=DEFAULTS["seed"],
        help="random seed of the initialisation, the batches and the samples (default: %(default)s)",
    )
    parser.add_argument(
        "--out",
        type=_path,
        default=DEFAULTS["out"],
        metavar="DIR",
        help="folder for metrics.json, summary.txt and loss.png (default: ./%(default)s/)",
    )
    parser.add_argument(
        "--output",
        choices=OUTPUTS,
        default=DEFAULTS["output"],
        help="the output layer: the hierarchical softmax (hsoftmax), the logits-free exact "
        "softmax (full), the exact softmax that builds the logits (naive), the exact softmax "
        "with the gradient filter (filtered), the sampled softmax (sampled) or the adaptive "
        "softmax (adaptive) (default: %(default)s)",
    )
    parser.add_argument(
        "--no-baseline",
        action="store_true",
        help="skip the full-softmax baseline (faster; no speedup is reported)",
    )
    parser.add_argument(
        "--checkpoint",
        type=_path,
        metavar="PATH",
        help="save the parameters, optimizer state and step to PATH (.npz) during and after "
        "training; a later run with the same PATH and options resumes where it stopped",
    )
