"""Word-level language modelling on Penn Treebank with plastic LSTMs (Backpropamine, Miconi et al.
ICLR 2019) on the fused ops of backpropamine_cuda: awd-lstm-lm's training (Merity et al. 2018) as
Backpropamine's fork ran it, every flag of its parser with its meaning, and the paper's small
model (Table 1) behind --preset small. Writes the best model, a checkpoint every epoch, a CSV log
with its plot, and at the end a results file (<log>.json: the perplexities, the test one
included, and what produced them). See experiments/ptb/README.md.

    python main.py --batch_size 6 --data data/penn --dropouti 0.4 --dropouth 0.25 --epoch 500 \
        --save PTB.pt --wdrop 0 --model PLASTICLSTM --modultype modplasth2mod --modulout fanout \
        --nhid 1149 --alphatype perneuron --asgdtime 125 --agdiv 1149
    python main.py --data data/penn --preset small --variant retroactive
    torchrun --nproc_per_node 2 main.py ...        # data parallel, each process its own streams
"""

import argparse
import math
import os
import random
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

sys.path.append(str(Path(__file__).resolve().parents[2]))  # the root, for experiments.common
import backpropamine_cuda as bp  # noqa: E402
from experiments.common import (  # noqa: E402
    SEED,
    DataError,
    append_csv,
    atomic_save,
    closest_size,
    count_parameters,
    load_checkpoint,
    number,
    out_of_memory_exits,
    progress,
    pyplot,
    read_csv_rows,
    require_device,
    require_extras,
    resume_csv,
    rng_states,
    torch_device,
    write_json,
)
from experiments.ptb.data import Corpus, batchify, get_batch  # noqa: E402
from experiments.ptb.model import LanguageModel, detach_state  # noqa: E402

EVAL_BATCH_SIZE, TEST_BATCH_SIZE = 10, 1  # as awd-lstm-lm
LOG_FIELDS = ("epoch", "train_ppl", "valid_ppl", "lr", "seconds", "tokens_per_s")
# What a checkpoint relies on to resume exactly (one taken inside an epoch also holds the
# hidden states the next segment starts from).
HIDDEN_STATE_POLICY = (
    "hidden states and traces reset at the start of every training epoch and "
    "evaluation, carried detached across BPTT segments"
)
# Options a resumed run may change; all others (the model, --batch_size, --bptt, --seed, the
# preset and variant) must be those of the run that wrote the checkpoint.
RESUME_MAY_CHANGE = (
    "data",
    "init_range",
    "dropout",
    "dropouth",
    "dropouti",
    "dropoute",
    "wdrop",
    "impl",
    "lr",
    "loss",
    "clip",
    "epochs",
    "variable_bptt",
    "alpha",
    "beta",
    "wdecay",
    "lr_decay",
    "lr_decay_start",
    "asgdtime",
    "nonmono",
    "agdiv",
    "when",
    "device",
    "cuda",
    "numgpu",
    "save",
    "log",
    "log_interval",
    "resume",
    "max_batches",
    "time_limit",
    "checkpoint_interval",
    "proplstm",
)
FLAGS = {"batch_size": "--batch_size"}  # awd-lstm-lm's spelling; the other flags use hyphens

# The paper's small model (Table 1): defaults of --preset small, and its four variants, each a
# set of the model flags. Every variant gets the hidden size (embedding = hidden) that brings it
# closest to SMALL_TARGET_PARAMS parameters on the Penn Treebank vocabulary.
SMALL_PRESET = dict(
    emsize=None,
    nhid=None,
    nlayers=2,
    tied=False,
    init_range=0.1,
    dropout=0.0,
    dropouth=0.0,
    dropouti=0.0,
    dropoute=0.0,
    wdrop=0.0,
    alpha=0.0,
    beta=0.0,
    batch_size=20,
    bptt=20,
    variable_bptt=False,
    loss="time-sum",
    lr=1.0,
    clip=5.0,
    epochs=13,
    wdecay=1e-5,
    lr_decay=0.4,
    lr_decay_start=6,
    asgdtime=0,
    clipval=1.0,
)
SMALL_VARIANTS = {
    "baseline": dict(model="MYLSTM"),
    "plastic": dict(
        model="PLASTICLSTM",
        modultype="none",
        modulout="none",
        alphatype="full",
        etatype="full",
        cliptype="clip",
    ),
    "simple": dict(
        model="PLASTICLSTM",
        modultype="modplasth2mod",
        modulout="single",
        modulator_input="h_prev",
        alphatype="full",
        cliptype="clip",
    ),
    "retroactive": dict(
        model="PLASTICLSTM",
        modultype="modplasth2mod",
        modulout="single",
        modulator_input="h_prev",
        alphatype="full",
        cliptype="retroactive",
    ),
}
SMALL_TARGET_PARAMS, PTB_VOCABULARY = 4_800_000, 10_000
ALPHA_SHAPES = {"full": "full", "perneuron": "neuron", "single": "scalar"}
# --cliptype takes bp's rules and the original's name of one of them: aditya, the trace grows
# unclipped and is clipped only where it enters the product (rule clip_on_read).
CLIPTYPE_RULES = {"aditya": "clip_on_read"}
# --hebboutput, the post-synaptic term of the Hebbian product, as bp.PlasticLSTM's post_input:
# i2c, the cell candidate g_t; h2co, the plastic path's pre-activation u_t; cell, c_t; hidden, h_t.
HEBB_OUTPUTS = {"i2c": "g", "h2co": "u", "cell": "c", "hidden": "h"}


def make_parser():
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    add = p.add_argument
    add("--data", default="data/penn", help="folder with train.txt, valid.txt, test.txt")
    add(
        "--preset",
        choices=("large", "small"),
        default="large",
        help="large: awd-lstm-lm defaults; small: the paper's Table 1 model (see README)",
    )
    add(
        "--variant",
        choices=tuple(SMALL_VARIANTS),
        help="--preset small only: which Table 1 model (default baseline); sets the model flags",
    )
    # model
    add(
        "--model",
        choices=("PLASTICLSTM", "MYLSTM"),
        default="PLASTICLSTM",
        help="MYLSTM: the non-plastic LSTM baseline",
    )
    add(
        "--modultype",
        choices=("none", "modplasth2mod", "modplastc2mod"),
        default="modplasth2mod",
        help="none: learned plasticity rate eta; modplasth2mod / modplastc2mod: neuromodulation "
        "computed from h / c_t (--modulator-input says which h)",
    )
    add(
        "--modulator-input",
        choices=bp.reference.MODULATOR_INPUTS,
        help="what the neuromodulator of step t reads, bp.PlasticLSTM's modulator_input: h (h_t), "
        "c (c_t, --modultype modplastc2mod's) or h_prev (h_{t-1}, the paper's small models'); "
        "default c with --modultype modplastc2mod, h_prev in --preset small's modulated "
        "variants, else h",
    )
    add(
        "--modulout",
        choices=("none", "single", "fanout"),
        default="fanout",
        help="single: one rate per sample; fanout: one per post-synaptic neuron (ignored with "
        "--modultype none, as in the original)",
    )
    add(
        "--alphatype",
        choices=tuple(ALPHA_SHAPES),
        default="perneuron",
        help="plasticity coefficients: one per connection, per post-synaptic neuron, or one",
    )
    add(
        "--etatype",
        choices=("scalar", "full"),
        default="scalar",
        help="shape of the learned eta with --modultype none",
    )
    add(
        "--cliptype",
        choices=bp.reference.RULES + tuple(CLIPTYPE_RULES),
        default="clip",
        help="plasticity rule, bp.PlasticLSTM's `rule` (retroactive: eligibility traces, needs "
        "neuromodulation); the original's aditya (the trace clipped only where it enters the "
        "product) is rule clip_on_read",
    )
    add(
        "--clipval",
        type=number(float, 0, strict=True),
        default=2.0,
        help="bound of the Hebbian traces (small preset: 1)",
    )
    add(
        "--hebboutput",
        choices=tuple(HEBB_OUTPUTS),
        default="i2c",
        help="post-synaptic term of the Hebbian product (bp.PlasticLSTM's post_input): i2c, the "
        "cell candidate g_t; h2co, the plastic path's pre-activation u_t; cell, c_t; hidden, h_t",
    )
    add(
        "--proplstm",
        type=float,
        default=0.5,
        help="the original's share of LSTM cells in its split-LSTM models, which are not part "
        "of this package: accepted, no effect",
    )
    add("--emsize", type=number(int, 1), default=400, help="embedding size (small preset: = nhid)")
    add(
        "--nhid",
        type=number(int, 1),
        default=1150,
        help="units per layer (small preset: the variant's matched size)",
    )
    add("--nlayers", type=number(int, 1), default=3)
    add(
        "--tied",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="decoder weight = embedding table",
    )
    add(
        "--init-range",
        type=number(float, 0),
        default=0.0,
        help="> 0: all but plastic parameters uniform in +-this; 0: awd-lstm-lm's init",
    )
    add(
        "--dropout",
        type=number(float, 0, maximum=1),
        default=0.4,
        help="locked dropout on the last layer's output",
    )
    add(
        "--dropouth",
        type=number(float, 0, maximum=1),
        default=0.3,
        help="locked dropout between layers",
    )
    add(
        "--dropouti",
        type=number(float, 0, maximum=1),
        default=0.65,
        help="locked dropout on the embeddings",
    )
    add(
        "--dropoute",
        type=number(float, 0, maximum=1),
        default=0.1,
        help="dropout of whole word embeddings",
    )
    add(
        "--wdrop",
        type=number(float, 0, maximum=1),
        default=0.5,
        help="DropConnect on the recurrent weights",
    )
    add(
        "--impl",
        choices=("fused", "reference"),
        default="fused",
        help="plastic LSTM implementation: fused kernels or the pure-PyTorch reference",
    )
    # training
    add("--lr", type=number(float, 0, strict=True), default=30.0)
    add(
        "--loss",
        choices=("mean", "time-sum"),
        default="mean",
        help="what the gradient step sees: the cross-entropy averaged over the segment's tokens "
        "(awd-lstm-lm), or summed over its time steps and averaged over the streams "
        "(Zaremba et al. 2014, for whom lr 1 and clip 5 were tuned); perplexities are per "
        "token either way",
    )
    add("--clip", type=number(float, 0), default=0.25, help="gradient norm clip (0: none)")
    add("--epochs", type=number(int, 1), default=8000)
    add(
        "--batch_size", type=number(int, 1), default=80, help="training streams, over all processes"
    )
    add("--bptt", type=number(int, 1), default=70, help="truncated backpropagation length")
    add(
        "--variable-bptt",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="awd-lstm-lm's random BPTT lengths, the learning rate scaled by length / bptt",
    )
    add("--alpha", type=number(float, 0), default=2.0, help="activation regularisation (AR) weight")
    add(
        "--beta",
        type=number(float, 0),
        default=1.0,
        help="temporal activation regularisation (TAR)",
    )
    add("--wdecay", type=number(float, 0), default=1.2e-6, help="L2 penalty (SGD weight decay)")
    add(
        "--lr-decay",
        type=number(float, 0, strict=True),
        default=1.0,
        help="learning rate factor per epoch ...",
    )
    add("--lr-decay-start", type=int, default=1, help="... from this epoch on")
    add(
        "--optimizer",
        choices=("sgd", "adam"),
        default="sgd",
        help="adam: torch's Adam with --lr and --wdecay, never switching to averaged SGD",
    )
    add(
        "--asgdtime",
        type=int,
        default=-1,
        help="< 0: switch to averaged SGD when validation stops improving (--nonmono); > 0: at "
        "the end of epoch asgdtime + 1; 0: never (--optimizer sgd only)",
    )
    add("--nonmono", type=number(int, 1), default=5, help="epochs of the non-monotone ASGD trigger")
    add(
        "--when",
        type=int,
        nargs="+",
        default=[-1],
        metavar="EPOCH",
        help="divide the learning rate by 10 at the end of these epochs, first saving the model "
        "to <--save>.e<epoch>; only before the switch to averaged SGD, which restarts at "
        "--lr, as in the original (-1: never)",
    )
    add(
        "--agdiv",
        type=number(float, 0, strict=True),
        default=1.0,
        help="divide the gradients of alpha by this with --alphatype perneuron or single",
    )
    add("--seed", type=SEED, default=1111)
    # running
    add(
        "--device",
        type=lambda text: text if text == "auto" else torch_device(text),
        default="auto",
        help="auto (cuda if available), cpu, cuda, cuda:1, ...",
    )
    add(
        "--cuda",
        action="store_false",
        help="the original's switch, with its meaning: given, it turns CUDA OFF (the run uses "
        "the CPU, as --device cpu; with another --device it is an error)",
    )
    add(
        "--numgpu",
        type=number(int, 0),
        metavar="N",
        help="the original's GPU index: cuda:N when the run uses CUDA (no effect on the CPU; "
        "under torchrun each process uses the GPU of its local rank)",
    )
    add(
        "--save",
        default="PTB.pt",
        help="best model (by validation); the last checkpoint goes to <save stem>.checkpoint.pt",
    )
    add("--log", help="CSV of the epochs (default <save stem>.csv), plotted to the same name .png")
    add(
        "--resume",
        nargs="?",
        const=True,
        default=False,
        metavar="CHECKPOINT",
        help="continue from the last checkpoint (<save stem>.checkpoint.pt, or the one given; "
        "'', the original's default: start afresh)",
    )
    add(
        "--log-interval",
        type=int,
        default=200,
        help="the original's report interval in batches: accepted, no effect (the progress "
        "display shows the running perplexity)",
    )
    add(
        "--max-batches",
        type=number(int, 0),
        default=0,
        help="> 0: end every epoch and evaluation after this many batches (quick runs)",
    )
    add(
        "--time-limit",
        type=number(float, 0),
        default=0.0,
        help="> 0: stop training after this many seconds, checkpointed at the batch where it "
        "stopped (one process; under torchrun at the last completed epoch); --resume continues "
        "from there",
    )
    add(
        "--checkpoint-interval",
        type=number(float, 0),
        default=0.0,
        help="> 0: also checkpoint inside an epoch every this many seconds (one process), so "
        "that a killed run loses at most that much; 0: at the end of every epoch only",
    )
    return p


def parse_args(argv=None):
    parser = make_parser()
    args = parser.parse_args(argv)
    if args.preset == "small":  # the preset's defaults; flags given explicitly still win
        parser.set_defaults(**SMALL_PRESET, **SMALL_VARIANTS[args.variant or "baseline"])
        args = parser.parse_args(argv)
    from_c = args.modultype == "modplastc2mod"
    if args.modulator_input is None:
        args.modulator_input = "c" if from_c else "h"
    elif from_c != (args.modulator_input == "c") and args.modultype != "none":
        parser.error(
            f"--modultype {args.modultype} contradicts --modulator-input {args.modulator_input} "
            "(modplastc2mod reads c, modplasth2mod h or h_prev)"
        )
    if args.preset == "small":
        args.variant = args.variant or "baseline"
        if args.nhid is None:
            args.nhid = small_hidden_sizes(args)[args.variant][0]
    elif args.variant:
        parser.error("--variant needs --preset small")
    if args.emsize is None:
        args.emsize = args.nhid
    if not args.cuda and args.device not in ("auto", "cpu"):
        parser.error(f"--cuda (the original's switch: CUDA off) contradicts --device {args.device}")
    if (
        args.numgpu is not None
        and args.device.startswith("cuda:")
        and torch.device(args.device).index != args.numgpu
    ):
        parser.error(f"--numgpu {args.numgpu} contradicts --device {args.device}")
    if args.model == "PLASTICLSTM":
        if args.modultype != "none" and args.modulout == "none":
            parser.error(
                f"--modultype {args.modultype} with --modulout none: neuromodulation "
                "needs --modulout single or fanout"
            )
        if args.cliptype == "retroactive" and args.modultype == "none":
            parser.error(
                "--cliptype retroactive needs neuromodulation (--modultype "
                "modplasth2mod or modplastc2mod)"
            )
    return args


def layer_options(args):
    """bp.PlasticLSTM options of the Backpropamine flags."""
    if args.model == "MYLSTM":
        return dict(plastic=False, impl=args.impl)
    modulation = (
        "none"
        if args.modultype == "none"
        else {"single": "simple", "fanout": "fanout"}[args.modulout]
    )
    return dict(
        alpha=ALPHA_SHAPES[args.alphatype],
        modulation=modulation,
        modulator_input=args.modulator_input,
        post_input=HEBB_OUTPUTS[args.hebboutput],
        rule=CLIPTYPE_RULES.get(args.cliptype, args.cliptype),
        clip=args.clipval,
        eta_shape=args.etatype,
        impl=args.impl,
    )


def build_model(args, ntokens, shard=(0, 1)):
    return LanguageModel(
        ntokens,
        args.emsize,
        args.nhid,
        args.nlayers,
        layer_options(args),
        tied=args.tied,
        dropout=args.dropout,
        dropouth=args.dropouth,
        dropouti=args.dropouti,
        dropoute=args.dropoute,
        wdrop=args.wdrop,
        init_range=args.init_range,
        shard=shard,
    )


def small_hidden_sizes(args):
    """{variant: (hidden size, parameters)}: for each small variant the size (embedding = hidden)
    whose parameter count on the PTB vocabulary is closest to SMALL_TARGET_PARAMS."""

    def count(variant, n):
        options = argparse.Namespace(
            **{**vars(args), **SMALL_VARIANTS[variant], "nhid": n, "emsize": n}
        )
        with torch.device("meta"):  # shapes only, no memory
            return count_parameters(build_model(options, PTB_VOCABULARY))

    sizes = {}
    for variant in SMALL_VARIANTS:
        n = closest_size(lambda n: count(variant, n), SMALL_TARGET_PARAMS)
        sizes[variant] = (n, count(variant, n))
    return sizes


# ----------------------------------------------------------------------------------------------
# Training and evaluation


def bptt_length(args):
    """Length of the next training segment: awd-lstm-lm's variable BPTT (bptt, or bptt / 2 with
    probability 0.05, normal jitter of sd 5, at least 5 and at most bptt + 10)."""
    if not args.variable_bptt:
        return args.bptt
    bptt = args.bptt if np.random.random() < 0.95 else args.bptt / 2
    return min(max(5, int(np.random.normal(bptt, 5))), args.bptt + 10)


def epoch_lr(args, epoch, switched_after=None):
    """The learning rate of `epoch`: --lr, --lr-decay's factor, and 1/10 for each epoch of
    --when before it, as the original: only before the switch to averaged SGD (at the end of
    epoch `switched_after`, None before it), which restarts at --lr, divided once more when the
    switch epoch is itself in --when."""
    if switched_after is None:
        divisions = sum(1 for e in set(args.when) if 0 < e < epoch)
    else:
        divisions = int(switched_after in args.when)
    return args.lr * args.lr_decay ** max(0, epoch - args.lr_decay_start + 1) * 0.1**divisions


def divided_alphas(model, args):
    """The alphas whose gradients --agdiv divides: per-neuron or single ones, whose gradients
    sum over the N (or N * N) connections each coefficient serves (Backpropamine: agdiv N)."""
    if args.model == "MYLSTM" or args.alphatype == "full":
        return []
    return [rnn.alpha for rnn in model.rnns]


def train_step(model, optimizer, data, targets, hidden, args, alphas):
    """One optimiser step on a BPTT segment (data (T, B) -> targets (T * B)); returns the
    cross-entropy before the penalties (detached) and the new hidden state."""
    optimizer.zero_grad()
    logits, hidden, raw, dropped = model(data, hidden)
    raw_loss = F.cross_entropy(logits, targets)
    loss = raw_loss
    if args.alpha:  # AR: large activations, after the output dropout
        loss = loss + args.alpha * dropped.pow(2).mean()
    if args.beta and raw.size(0) > 1:  # TAR: fast changes (undefined on a 1-step segment)
        loss = loss + args.beta * (raw[1:] - raw[:-1]).pow(2).mean()
    if args.loss == "time-sum":
        loss = loss * data.size(0)
    loss.backward()
    for alpha in alphas:
        alpha.grad /= args.agdiv
    if args.clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
    optimizer.step()
    return raw_loss.detach(), hidden


def time_is_up(deadline, world, device):
    """Whether --time-limit has passed; every process takes the same decision."""
    if deadline is None:
        return False
    up = torch.tensor(float(time.time() > deadline), device=device)
    if world > 1:
        dist.all_reduce(up, op=dist.ReduceOp.MAX)
    return bool(up)


@dataclass
class EpochPosition:
    """Where a training epoch stands after a batch (what a checkpoint taken inside an epoch
    holds): the next segment's first row, batches and target tokens so far, their summed
    cross-entropy, the hidden states carried to the next segment, and the training seconds
    spent on the epoch."""

    row: int = 0
    batches: int = 0
    tokens: int = 0
    loss_sum: float = 0.0
    hidden: list = None
    seconds: float = 0.0

    def saved(self):
        """As a checkpoint stores it: plain tuples of tensors for the layers' states."""
        hidden = [None if s is None else tuple(s) for s in self.hidden]
        return dict(vars(self), hidden=hidden)

    @classmethod
    def restored(cls, saved, device):
        def state(tensors):
            return bp.PlasticLSTMState(*(t if t is None else t.to(device) for t in tensors))

        hidden = [None if s is None else state(s) for s in saved["hidden"]]
        return cls(**dict(saved, hidden=hidden))


def train_epoch(r, lr, position, deadline, save_position):
    """The pass over this process's streams that `position` has reached (a fresh one: from
    fresh hidden states), one segment at a time. Returns the position at its end or where
    --time-limit cut it, and whether the epoch completed. Calls save_position(position) every
    --checkpoint-interval seconds and at the cut (one process only: under torchrun each process
    holds other streams' hidden states)."""
    args, module, train_data = r.args, r.model, r.data["train"]
    r.trained.train()
    alphas = divided_alphas(module, args)
    if position.hidden is None:
        position.hidden = [None] * len(module.rnns)
    loss_sum = torch.tensor(position.loss_sum, device=train_data.device)
    seconds_before, started = position.seconds, time.time()
    last_saved = started
    complete = True
    bar = progress(
        total=train_data.size(0) - 1,
        initial=position.row,
        unit="tok",
        unit_scale=args.batch_size,
        desc="train",
        disable=not r.show,
    )

    def update_position():
        position.loss_sum = loss_sum.item()
        position.seconds = seconds_before + time.time() - started
        return position

    while position.row < train_data.size(0) - 2:
        seq_len = bptt_length(args)
        for group in r.optimizer.param_groups:  # a short segment makes a small step
            group["lr"] = lr * seq_len / args.bptt
        data, targets = get_batch(train_data, position.row, seq_len)
        raw_loss, position.hidden = train_step(
            r.trained, r.optimizer, data, targets, detach_state(position.hidden), args, alphas
        )
        for rnn in module.rnns:  # a rate outside [0, 1] makes the eligibility trace diverge
            rnn.clamp_elig_rate_()
        loss_sum += raw_loss * targets.numel()
        position.tokens += targets.numel()
        position.row, position.batches = position.row + seq_len, position.batches + 1
        bar.update(data.size(0))
        if position.batches % 10 == 1:
            bar.set_postfix(ppl=f"{math.exp(loss_sum.item() / position.tokens):.1f}")
        if position.batches == args.max_batches:
            break
        if time_is_up(deadline, r.world, train_data.device):
            complete = False
            break
        if r.world == 1 and args.checkpoint_interval:
            if time.time() - last_saved > args.checkpoint_interval:
                save_position(update_position())
                last_saved = time.time()
    bar.close()
    update_position()
    if not complete and r.world == 1:
        save_position(position)
    return position, complete


@torch.no_grad()
def evaluate(model, source, args, show, desc):
    """Mean cross-entropy per token over the streams of `source`, from fresh hidden states."""
    model.eval()
    hidden = [None] * len(model.rnns)
    loss_sum, tokens = 0.0, 0
    starts = range(0, source.size(0) - 1, args.bptt)[: args.max_batches or None]
    for i in progress(starts, desc=desc, disable=not show):
        data, targets = get_batch(source, i, args.bptt)
        logits, hidden, _, _ = model(data, hidden)
        loss_sum += F.cross_entropy(logits, targets, reduction="sum").item()
        tokens += targets.numel()
    return loss_sum / tokens


@contextmanager
def averaged_weights(model, optimizer):
    """Inside: the model has ASGD's averaged weights (none before ASGD has made a step)."""
    if not isinstance(optimizer, torch.optim.ASGD) or not optimizer.state:
        yield
        return
    params = list(model.parameters())
    current = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p in params:
            p.copy_(optimizer.state[p]["ax"])
    try:
        yield
    finally:
        with torch.no_grad():
            for p, saved in zip(params, current):
                p.copy_(saved)


def averaging_starts(args, epoch, valid_loss, history):
    """Whether SGD switches to averaged SGD after this epoch: with asgdtime < 0 by Merity's
    non-monotone trigger (the validation loss is worse than the best of the epochs before the
    last `nonmono`; `history`: the earlier epochs' losses), with asgdtime > 0 at the end of
    epoch asgdtime + 1, with 0 never."""
    if args.optimizer != "sgd" or args.asgdtime == 0:
        return False
    if args.asgdtime > 0:
        return args.asgdtime < epoch
    return len(history) > args.nonmono and valid_loss > min(history[: -args.nonmono])


def make_optimizer(model, args):
    if args.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=args.lr, weight_decay=args.wdecay)
    return torch.optim.SGD(model.parameters(), lr=args.lr, weight_decay=args.wdecay)


def averaged_sgd(model, args):
    # As awd-lstm-lm: averaging from the first step on, no decay. torch's ASGD applies the rate
    # it stored at the previous step, so the BPTT length scaling lags by one step (as there).
    return torch.optim.ASGD(
        model.parameters(), lr=args.lr, t0=0, lambd=0.0, weight_decay=args.wdecay
    )


# ----------------------------------------------------------------------------------------------
# Checkpoints, log, plot


def output_paths(args):
    """The files written: --save, its checkpoint, --log and its plot. A folder that does not
    exist exits now, not after the first epoch."""
    save = Path(args.save)
    log = Path(args.log) if args.log else save.with_suffix(".csv")
    for flag, path in (("--save", save), ("--log", log)):
        if not path.parent.is_dir():
            raise SystemExit(f"{flag} {path}: the folder {path.parent} does not exist")
    return dict(
        save=save,
        checkpoint=save.with_name(save.stem + ".checkpoint.pt"),
        log=log,
        plot=log.with_suffix(".png"),
        results=log.with_suffix(".json"),
    )


CHECKPOINT_KEYS = (
    "model",
    "optimizer",
    "asgd",
    "epoch",
    "best_valid",
    "valid_history",
    "rng",
    "args",
    "hidden_state_policy",
)


def resume_checkpoint(path, args, model):
    """Restores the model and the random states from the checkpoint at `path` (common's
    load_checkpoint: options outside RESUME_MAY_CHANGE must match); returns the checkpoint."""
    if not path.is_file():
        raise SystemExit(
            f"--resume: no checkpoint at {path} (it is written at the end of every "
            "epoch, next to --save)"
        )
    ckpt = load_checkpoint(path, args, RESUME_MAY_CHANGE, CHECKPOINT_KEYS, FLAGS)
    if ckpt["hidden_state_policy"] != HIDDEN_STATE_POLICY:
        raise SystemExit(
            f"--resume: {path} assumes another hidden-state policy: {ckpt['hidden_state_policy']!r}"
        )
    model.load_state_dict(ckpt["model"])
    return ckpt


def log_epoch(paths, row):
    """Appends the epoch's row to the CSV log and plots the log."""
    rows = append_csv(paths["log"], LOG_FIELDS, [row])
    plt = pyplot()
    from matplotlib import ticker

    fig, ax = plt.subplots(figsize=(6, 4))
    epochs = [int(r["epoch"]) for r in rows]
    for key, label in (("train_ppl", "train"), ("valid_ppl", "valid")):
        ax.plot(epochs, [float(r[key]) for r in rows], marker=".", label=label)
    ax.set(xlabel="epoch", ylabel="perplexity", yscale="log", title=paths["log"].stem)
    ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
    for set_formatter in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):
        set_formatter(ticker.LogFormatter(labelOnlyBase=False))  # 20, not 2x10^1
    ax.legend()
    fig.tight_layout()
    fig.savefig(paths["plot"], dpi=100)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------


def select_device(args):
    """--device, where the original's --cuda (given: CUDA off) means the CPU and its --numgpu N
    the GPU cuda:N (parse_args refuses the contradictory combinations)."""
    if not args.cuda:
        return torch.device("cpu")
    device = torch.device(
        args.device if args.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu"
    )
    if device.type == "cuda" and args.numgpu is not None:
        return torch.device("cuda", args.numgpu)
    return device


def init_distributed(args):
    """(rank, world size, device). Under torchrun (WORLD_SIZE > 1) joins the process group:
    nccl on GPUs (one per local rank), gloo on CPUs."""
    device = select_device(args)
    require_device(device)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, device
    if device.type == "cuda":
        if args.numgpu is not None:
            raise SystemExit("--numgpu: under torchrun each process uses the GPU of its local rank")
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), world, device


def check_lengths(corpus, args):
    """Exits naming the file when a split is too short to give a batch: training needs 3 rows
    of --batch_size streams (a segment and its next words), evaluation 2 rows of its streams."""
    for split, streams, rows in (
        ("train", args.batch_size, 3),
        ("valid", EVAL_BATCH_SIZE, 2),
        ("test", TEST_BATCH_SIZE, 2),
    ):
        tokens = getattr(corpus, split).numel()
        if tokens < rows * streams:
            raise SystemExit(
                f"--data: {Path(args.data) / f'{split}.txt'} has {tokens} tokens (words and "
                f"<eos>), too few for {'training' if split == 'train' else 'evaluation'} in "
                f"{streams} streams: at least {rows * streams} needed"
            )


def main(argv=None):
    args = parse_args(argv)
    require_extras()
    rank, world, device = init_distributed(args)
    try:
        return run(args, rank, world, device)
    finally:
        if world > 1:
            dist.destroy_process_group()


@dataclass
class Run:
    """One run's parts, and what the epoch loop carries from one epoch to the next (the state
    a checkpoint restores)."""

    args: argparse.Namespace
    paths: dict
    data: dict  # train (this process's streams), valid, test
    model: LanguageModel
    trained: torch.nn.Module  # the model, or its DistributedDataParallel wrapper
    optimizer: torch.optim.Optimizer
    world: int
    device: torch.device
    show: bool  # process 0: prints and writes the files
    first_epoch: int = 1
    first_position: EpochPosition = field(default_factory=EpochPosition)  # of first_epoch
    best_valid: float = math.inf
    valid_history: list = field(default_factory=list)  # validation losses before averaging
    stopped_by: str = "epochs"  # or "time limit"

    def say(self, *text):
        if self.show:
            print(*text, flush=True)


def run(args, rank, world, device):
    """Trains, tests the best model, writes the results file; returns the results (process 0)
    or None (the others)."""
    started = time.time()
    r = set_up(args, rank, world, device)
    train(r)
    if not r.show:  # the test runs in one process
        return None
    return report(r, started)


def set_up(args, rank, world, device):
    """Checks the outputs, seeds, loads the data, builds the model and its optimizer, and
    resumes from the checkpoint with --resume."""
    if args.batch_size % world:
        raise SystemExit(
            f"--batch_size {args.batch_size} must be divisible by the number of "
            f"processes, {world}: each process trains on an equal slice of streams"
        )
    paths = output_paths(args)
    show = rank == 0
    if show:
        print("args:", " ".join(f"{k}={v}" for k, v in vars(args).items()))
        if args.preset == "small":
            print(
                "small preset: hidden size matched to",
                f"{SMALL_TARGET_PARAMS:,}",
                "parameters:",
                ", ".join(f"{v} {n} ({c:,})" for v, (n, c) in small_hidden_sizes(args).items()),
            )
    # The same seed everywhere: every process draws the same BPTT lengths and dropout masks.
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    corpus, data = load_data(args, rank, world, device)
    model = build_model(args, len(corpus), shard=(rank, world)).to(device)
    trained = (
        model
        if world == 1
        else DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    )
    r = Run(args, paths, data, model, trained, make_optimizer(model, args), world, device, show)
    r.say(
        f"vocabulary {len(corpus):,}, train {corpus.train.numel():,}, valid "
        f"{corpus.valid.numel():,}, test {corpus.test.numel():,} tokens; "
        f"{count_parameters(model):,} parameters; {world} process(es) on {device}"
    )
    if args.resume:
        restore(r)
    if show:  # a resumed run keeps the rows of the epochs it resumes after
        resume_csv(paths["log"], LOG_FIELDS, "epoch", r.first_epoch - 1)
    return r


def load_data(args, rank, world, device):
    """The corpus, and its splits in streams on `device`: this process's slice of the
    training streams, the validation's and the test's."""
    try:
        corpus = Corpus(args.data)
    except (FileNotFoundError, DataError) as err:
        raise SystemExit(f"--data: {err}" if isinstance(err, DataError) else str(err)) from err
    check_lengths(corpus, args)
    streams = args.batch_size // world
    train_data = batchify(corpus.train, args.batch_size)[:, rank * streams : (rank + 1) * streams]
    return corpus, dict(
        train=train_data.to(device),
        valid=batchify(corpus.valid, EVAL_BATCH_SIZE).to(device),
        test=batchify(corpus.test, TEST_BATCH_SIZE).to(device),
    )


def restore(r):
    """The model, the optimizer and the loop's state from the checkpoint of --resume (the one
    next to --save, or the path given)."""
    path = r.paths["checkpoint"] if r.args.resume is True else Path(r.args.resume)
    ckpt = resume_checkpoint(path, r.args, r.model)
    if ckpt["asgd"]:
        r.optimizer = averaged_sgd(r.model, r.args)
    r.optimizer.load_state_dict(ckpt["optimizer"])
    r.first_epoch, r.best_valid = ckpt["epoch"] + 1, ckpt["best_valid"]
    r.valid_history = ckpt["valid_history"]
    if ckpt.get("position"):  # taken inside epoch first_epoch
        r.first_position = EpochPosition.restored(ckpt["position"], r.device)
        r.say(
            f"resumed from {path} inside epoch {r.first_epoch}, after its "
            f"{r.first_position.batches} batches"
        )
    else:
        r.say(f"resumed from {path} after epoch {ckpt['epoch']}")


def train(r):
    """The epoch loop: train, validate (keeping the best model), switch to averaged SGD or
    divide the learning rate when due, log and checkpoint; until --epochs or --time-limit."""
    args = r.args
    deadline = time.time() + args.time_limit if args.time_limit else None
    for epoch in range(r.first_epoch, args.epochs + 1):
        averaging = isinstance(r.optimizer, torch.optim.ASGD)
        lr = epoch_lr(args, epoch, len(r.valid_history) if averaging else None)
        position = r.first_position if epoch == r.first_epoch else EpochPosition()
        position, complete = train_epoch(
            r, lr, position, deadline, lambda at: r.show and save_checkpoint(r, epoch - 1, at)
        )
        if not complete:
            r.say(
                f"time limit: stopped during epoch {epoch} after its {position.batches} batches; "
                + (
                    "--resume continues from there"
                    if r.world == 1
                    else f"--resume restarts it from the checkpoint of epoch {epoch - 1}"
                )
            )
            r.stopped_by = "time limit"
            break
        totals = torch.tensor(
            [position.loss_sum, position.tokens], dtype=torch.float64, device=r.device
        )
        if r.world > 1:
            dist.all_reduce(totals)
        valid_start = time.time()
        valid_loss = validate(r)
        switch = not averaging and averaging_starts(args, epoch, valid_loss, r.valid_history)
        if not averaging:
            r.valid_history.append(valid_loss)
        loss_total, token_total = totals.tolist()
        row = dict(
            epoch=epoch,
            train_ppl=math.exp(loss_total / token_total),
            valid_ppl=math.exp(valid_loss),
            lr=lr,
            seconds=position.seconds + time.time() - valid_start,  # training + validation
            tokens_per_s=token_total / position.seconds,
        )
        r.say(
            f"| epoch {epoch:3d} | {row['seconds']:6.0f} s | {row['tokens_per_s']:7.0f} tok/s "
            f"| lr {lr:.3g} | train ppl {row['train_ppl']:8.2f} | valid ppl "
            f"{row['valid_ppl']:8.2f}" + (" (averaged weights)" if averaging else "")
        )
        if switch:
            r.say("switching to averaged SGD")
            r.optimizer = averaged_sgd(r.model, args)
        if not averaging and epoch in args.when and r.show:
            path = f"{r.paths['save']}.e{epoch}"
            r.say(f"learning rate divided by 10 from the next epoch; the model before: {path}")
            atomic_save(dict(model=r.model.state_dict(), args=vars(args)), path)
        if r.show:  # the row first: a kill before the checkpoint redoes the epoch (resume_csv)
            log_epoch(r.paths, row)
            save_checkpoint(r, epoch)
        if epoch < args.epochs and time_is_up(deadline, r.world, r.device):
            r.stopped_by = "time limit"  # after the last epoch the run is complete: test it
            break


def validate(r):
    """The validation loss (with ASGD's averaged weights once it averages); saves the model to
    --save when it is the best so far."""
    with averaged_weights(r.model, r.optimizer):
        valid_loss = evaluate(r.model, r.data["valid"], r.args, r.show, "valid")
        if valid_loss < r.best_valid:
            r.best_valid = valid_loss
            if r.show:
                atomic_save(dict(model=r.model.state_dict(), args=vars(r.args)), r.paths["save"])
    return valid_loss


def save_checkpoint(r, epoch, position=None):
    """The state after `epoch` completed epochs, and with `position` after its batches in the
    next one."""
    atomic_save(
        dict(
            model=r.model.state_dict(),
            optimizer=r.optimizer.state_dict(),
            asgd=isinstance(r.optimizer, torch.optim.ASGD),
            epoch=epoch,
            best_valid=r.best_valid,
            valid_history=r.valid_history,
            rng=rng_states(),
            args=vars(r.args),
            hidden_state_policy=HIDDEN_STATE_POLICY,
            position=position and position.saved(),
        ),
        r.paths["checkpoint"],
    )


def report(r, started):
    """Tests the best model (the last weights when no epoch has a finite validation loss),
    prints its perplexity and writes the results file beside the CSV log; returns the results.
    A run that --time-limit stopped is not tested (a run continued over several sessions would
    pay a test pass in each): its results have test_ppl None."""
    if r.stopped_by == "time limit":
        test_ppl, which = None, "not tested: stopped by --time-limit, --resume continues it"
    else:
        if r.best_valid < math.inf:
            r.model.load_state_dict(
                torch.load(r.paths["save"], map_location=r.device, weights_only=True)["model"]
            )
            which = f"best model ({r.paths['save']})"
        else:
            which = "last weights (no finite validation loss)"
        test_ppl = math.exp(evaluate(r.model, r.data["test"], r.args, r.show, "test"))
        r.say(f"| end of training | test ppl {test_ppl:8.2f} | {which}")
    rows = read_csv_rows(r.paths["log"])  # the epochs of this run and of those it resumed
    valid = [float(row["valid_ppl"]) for row in rows]
    speeds = [float(row["tokens_per_s"]) for row in rows]
    results = dict(
        test_ppl=test_ppl,
        tested=which,
        best_valid_ppl=min(valid, default=None),
        best_epoch=int(rows[valid.index(min(valid))]["epoch"]) if rows else None,
        final_valid_ppl=valid[-1] if rows else None,
        epochs_run=int(rows[-1]["epoch"]) if rows else 0,
        stopped_by=r.stopped_by,
        train_tokens_per_s=sum(speeds) / len(speeds) if rows else None,
        log=str(r.paths["log"]),
        args=vars(r.args),
    )
    write_json(r.paths["results"], results, started=started)
    r.say(f"results: {r.paths['results']}")
    return results


if __name__ == "__main__":
    with out_of_memory_exits("--batch_size, --bptt, --nhid or --emsize"):
        main()
