"""Chapter 7 checkers: GRPO's group advantages, the k3 KL estimator, the GRPO loss (also against
``trl.GRPOTrainer``'s on the same batch) and the verifiable reward."""

from __future__ import annotations

import torch

from ..config import fit_trl_logprob_tiles
from .core import CheckError, _loss_verdict, _scalar, call_learner, continues_with, expect_tensor, passed

EPS = 1e-4  # added to the group's standard deviation, as TRL does


# --- group advantages ------------------------------------------------------------------------
def _advantage_cases():
    return [
        (torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5]), 4),  # a group that all scored the same
        (torch.tensor([0.3, -1.2, 2.0, 0.7, -0.4, 1.1]), 3),
        (torch.tensor([2.0, -1.0, 0.5, 0.5, -3.0, 4.0, 1.0, 0.0]), 2),
    ]


def _advantage_mistakes(r: torch.Tensor, g: int, scale: bool):
    """(wrong answer, hint) pairs for the usual mistakes."""
    rows = r.view(-1, g)
    centred = rows - rows.mean(1, keepdim=True)
    batch = r - r.mean()
    yield (
        batch / (r.std() + EPS) if scale else batch,
        "you used the whole batch's mean (and std): GRPO's baseline is the mean reward of the answers "
        "to the *same prompt* (one group)",
    )
    if scale:
        yield (
            (centred / (rows.std(1, unbiased=False, keepdim=True) + EPS)).flatten(),
            "that is the population standard deviation (unbiased=False); TRL, and this course, use the "
            "sample one (torch's default)",
        )
        yield centred.flatten(), "with scale=True, divide by the group's standard deviation (+ 1e-4)"
    else:
        yield (
            (centred / (rows.std(1, keepdim=True) + EPS)).flatten(),
            "scale=False is Dr. GRPO: subtract the group's mean, do not divide by its std",
        )
    cols = r.view(g, -1).T  # groups taken as every (B/G)-th answer: the wrong layout
    wrong = cols - cols.mean(1, keepdim=True)
    if scale:
        wrong = wrong / (cols.std(1, keepdim=True) + EPS)
    yield (
        wrong.T.flatten(),
        "a group is `group_size` *consecutive* answers: rewards.view(-1, group_size), one row per prompt",
    )


@continues_with("from utils.grpo import group_advantages")
def check_group_advantages(fn) -> None:
    """``fn(rewards[B], group_size, scale=True) -> [B]``: reward minus its group's mean, divided (with
    ``scale``) by the group's sample standard deviation + 1e-4; groups are consecutive."""
    from ..grpo import group_advantages as reference

    name = getattr(fn, "__name__", "group_advantages")
    for i, (r, g) in enumerate(_advantage_cases()):
        for scale in (True, False):
            got = expect_tensor(call_learner(fn, name, r.clone(), g, scale), name, shape=r.shape)
            want = reference(r, g, scale)
            if torch.allclose(got.float(), want, atol=1e-4):
                continue
            if not torch.isfinite(got).all():
                raise CheckError(
                    f"`{name}` returned {got.tolist()} on case {i}: a group whose answers all scored the "
                    "same has standard deviation 0; add 1e-4 to the std before dividing"
                )
            hint = next(
                (h for v, h in _advantage_mistakes(r, g, scale) if torch.allclose(got.float(), v, atol=1e-4)),
                "advantage = (reward - its group's mean) / (its group's std + 1e-4)",
            )
            raise CheckError(
                f"`{name}` gave {[round(x, 4) for x in got.tolist()]} on case {i} (group_size={g}, "
                f"scale={scale}) where the answer is {[round(x, 4) for x in want.tolist()]}: {hint}"
            )
    passed(f"`{name}`: the group's mean as baseline, its std as normaliser (or not), on 3 batches")


# --- the k3 estimator ------------------------------------------------------------------------
@continues_with("from utils.grpo import kl_k3")
def check_kl_k3(fn) -> None:
    """``fn(logprobs, ref_logprobs) -> same shape``: ``exp(ref - logp) - (ref - logp) - 1`` per token."""
    name = getattr(fn, "__name__", "kl_k3")
    g = torch.Generator().manual_seed(7)
    logp = -torch.rand(3, 6, generator=g) * 4
    ref = logp + torch.randn(3, 6, generator=g)
    got = expect_tensor(call_learner(fn, name, logp.clone(), ref.clone()), name, shape=logp.shape)
    log_r = ref - logp
    want = torch.exp(log_r) - log_r - 1
    if torch.allclose(got.float(), want, atol=1e-5):
        same = call_learner(fn, name, logp.clone(), logp.clone())
        if not torch.allclose(same.float(), torch.zeros_like(logp), atol=1e-6):
            raise CheckError(f"`{name}` is not 0 where the policy equals the reference")
        passed(
            f"`{name}`: exp(log r) - log r - 1 with log r = log pi_ref - log pi; >= 0 and 0 at pi = pi_ref"
        )
        return
    flipped = torch.exp(-log_r) + log_r - 1
    hints = [
        (flipped, "the ratio is upside down: r = pi_ref / pi, i.e. log r = ref_logprobs - logprobs"),
        (-log_r, "that is k1 (log pi - log pi_ref): unbiased too, but it can be negative token by token"),
        (0.5 * log_r**2, "that is k2 (half the squared log-ratio): never negative but biased"),
    ]
    hint = next(
        (h for v, h in hints if torch.allclose(got.float(), v, atol=1e-5)), "k3 = exp(log r) - log r - 1"
    )
    raise CheckError(f"`{name}` does not give k3: {hint}")


# --- the GRPO loss ---------------------------------------------------------------------------
def _loss_cases():
    g = torch.Generator().manual_seed(3)
    cases = []
    for batch, seq, beta in [(4, 5, 0.04), (6, 7, 0.0), (3, 4, 0.5)]:
        old = -torch.rand(batch, seq, generator=g) * 3
        logp = old + 0.4 * torch.randn(batch, seq, generator=g)  # ratios far enough from 1 to be clipped
        ref = old + 0.3 * torch.randn(batch, seq, generator=g)
        adv = torch.randn(batch, generator=g)
        mask = torch.ones(batch, seq)
        for i in range(batch):
            mask[i, seq - 1 - i % (seq - 1) :] = 0  # answers of different lengths
        cases.append((logp, old, ref, adv, mask, 0.2, beta))
    return cases


def _grpo_reference(
    logp, old, ref, adv, mask, clip, beta, *, token_mean=True, kl="k3", use_min=True, clipped=True
):
    ratio = torch.exp(logp - old)
    a = adv.unsqueeze(1)
    if not clipped:
        surrogate = ratio * a
    elif use_min:
        surrogate = torch.minimum(ratio * a, ratio.clamp(1 - clip, 1 + clip) * a)
    else:
        surrogate = torch.maximum(ratio * a, ratio.clamp(1 - clip, 1 + clip) * a)
    log_r = ref - logp
    penalty = {"k3": torch.exp(log_r) - log_r - 1, "k1": -log_r, "minus": -(torch.exp(log_r) - log_r - 1)}[kl]
    per_token = -surrogate + beta * penalty
    if token_mean:
        return (per_token * mask).sum() / mask.sum()
    return ((per_token * mask).sum(1) / mask.sum(1)).mean()


@continues_with("from utils.grpo import grpo_loss")
def check_grpo_loss(
    fn, policy=None, tokenizer=None, conversations=None, beta: float = 0.04, group_size: int = 4
) -> None:
    """``fn(logprobs, old_logprobs, ref_logprobs, advantages[B], mask, clip, beta) -> scalar``: the clipped
    surrogate plus ``beta`` times k3, averaged over every answer token of the batch.

    Checked on hand-made tensors and, with a policy, a tokenizer and conversations, against
    ``trl.GRPOTrainer``'s loss on the same sampled batch.
    """
    name = getattr(fn, "__name__", "grpo_loss")
    for i, (logp, old, ref, adv, mask, clip, b) in enumerate(_loss_cases()):
        lp = logp.clone().requires_grad_(True)
        got = _scalar(
            call_learner(fn, name, lp, old.clone(), ref.clone(), adv.clone(), mask.clone(), clip, b), name
        )
        args = (logp, old, ref, adv, mask, clip, b)
        _loss_verdict(
            got,
            _grpo_reference(*args),
            name,
            f"on case {i} (beta={b}) where the GRPO loss is",
            lambda args=args: [
                (
                    _grpo_reference(*args, token_mean=False),
                    "you averaged each answer over its tokens, then over answers (TRL's "
                    "loss_type='grpo', which weighs a short answer's tokens more); average over "
                    "every answer token of the batch at once",
                ),
                (
                    _grpo_reference(*args, use_min=False),
                    "the surrogate takes the *minimum* of the clipped and unclipped terms "
                    "(the pessimistic one)",
                ),
                (_grpo_reference(*args, clipped=False), "the ratio is not clipped"),
                (_grpo_reference(*args, kl="k1"), "the KL term is k1 (log pi - log pi_ref): use k3"),
                (
                    _grpo_reference(*args, kl="minus"),
                    "the KL term is added to the loss (+ beta * k3), not subtracted",
                ),
                (
                    (-(torch.exp(args[0] - args[1]) * args[3].unsqueeze(1)) * args[4]).sum() / args[4].sum(),
                    "clip the ratio and add the KL term",
                ),
            ],
            "per token: -min(ratio * A, clip(ratio, 1 - eps, 1 + eps) * A) + beta * k3, averaged over the "
            "mask's tokens",
            ": the loss needs the gradient of the policy's log-probabilities",
        )
    message = f"`{name}` matches GRPO's loss on 3 hand-made batches (clipping, k3, padding)"
    if policy is not None:
        message += _compare_with_grpo_trainer(fn, name, policy, tokenizer, conversations, beta, group_size)
    passed(message)


def _compare_with_grpo_trainer(fn, name, policy, tokenizer, conversations, beta, group_size) -> str:
    """TRL's ``GRPOTrainer._compute_loss`` and the learner's loss on one batch sampled from ``policy``.

    Both losses get the log-probabilities TRL computes. The old log-probabilities are shifted (as
    after a few updates) so that the ratio is not 1 and the clip matters, and the reference's the other
    way so that the KL term is not 0. The trainer is built with ``beta=0`` (with ``beta > 0`` it would
    reload a reference model from the policy's ``name_or_path``) and given ``beta`` afterwards: its
    loss reads only ``self.beta`` and the reference log-probabilities in its inputs.
    """
    import copy

    import datasets
    from trl import GRPOConfig, GRPOTrainer

    from ..rollout import sample_rollout

    datasets.disable_progress_bars()
    convs = list(conversations)[:4]
    device = next(policy.parameters()).device
    roll = sample_rollout(policy, tokenizer, [c for c in convs for _ in range(group_size)], seed=4242)
    args = GRPOConfig(
        output_dir="/tmp/course-grpo-check",
        per_device_train_batch_size=len(roll),
        num_generations=group_size,
        max_completion_length=roll.response.shape[1],
        beta=0.0,
        epsilon=0.2,
        report_to=[],
        save_strategy="no",
        use_cpu=device.type == "cpu",
        bf16=False,
        fp16=False,
        disable_tqdm=True,
        log_level="warning",
        activation_checkpointing=False,
        use_bias_correction_kl=False,  # the GRPO paper's k3; TRL's default multiplies it by the ratio
    )
    trainer = GRPOTrainer(
        model=copy.deepcopy(policy),
        reward_funcs=lambda completions, **kw: [0.0] * len(completions),
        args=args,
        train_dataset=datasets.Dataset.from_dict({"prompt": convs}),
        processing_class=tokenizer,
    )
    trainer.beta = beta
    fit_trl_logprob_tiles(trainer.model)
    g = torch.Generator().manual_seed(11)
    mask = roll.response_mask
    with torch.no_grad():
        trainer.model.eval()
        inputs = roll.model_inputs()
        width = roll.response.shape[1]
        logp = trainer._get_per_token_logps_and_entropies(
            trainer.model, inputs["input_ids"], inputs["attention_mask"], width
        )[0]  # TRL's own log-probabilities (its fused head, its positions), given to both losses
        shift = 0.3 * torch.randn(logp.shape, generator=g).to(device)
        old, ref = (logp + shift) * mask, (logp - 0.5 * shift) * mask
        advantages = torch.randn(len(roll), generator=g).to(device)
        inputs = {
            "prompt_ids": roll.query,
            "prompt_mask": roll.query_mask,
            "completion_ids": roll.response,
            "completion_mask": mask,
            "advantages": advantages,
            "old_per_token_logps": old,
            "ref_per_token_logps": ref,
            "num_items_in_batch": mask.sum(),
        }
        want = float(trainer._compute_loss(trainer.model, inputs))
    got = _scalar(call_learner(fn, name, logp, old, ref, advantages, mask, 0.2, beta), name).item()
    if abs(got - want) > 1e-4:
        raise CheckError(
            f"on {len(roll)} answers sampled from the model, `{name}` gives {got:.5f} but trl.GRPOTrainer "
            f"gives {want:.5f} (beta={beta}, loss_type={args.loss_type!r}, use_bias_correction_kl=False)"
        )
    return (
        f", and equals trl.GRPOTrainer's (loss_type={args.loss_type!r}, use_bias_correction_kl=False) "
        f"on {len(roll)} sampled answers ({want:.5f})"
    )


# --- the verifier ----------------------------------------------------------------------------
def verifier_cases(n_per_style: int = 40, seed: int = 0) -> list[tuple[list[dict], str, bool]]:
    """Answers in every TinyWorld annotator style (and compliant answers to harmful requests), plus
    cut-off and empty ones: ``(conversation, response, finished)``."""
    import random

    from ..world import make_world, parse_request, respond, single_turn_prompts

    world, rng = make_world(), random.Random(seed)
    prompts = single_turn_prompts(world)
    rng.shuffle(prompts)
    cases = []
    for _, text in prompts[: 6 * n_per_style]:
        conv = [{"role": "user", "content": text}]
        req = parse_request(conv, world)
        styles = ["good", "terse", "verbose", "rude", "wrong"] + (["comply"] if req.kind == "unsafe" else [])
        style = rng.choice(styles)
        cases.append((conv, respond(world, req, style, rng), True))
    from ..grpo import verify

    right = next(c for c in cases if verify(*c))
    cases.append((right[0], right[1], False))  # right, but cut off
    cases.append((cases[1][0], "", True))  # empty
    harmless = next(c for c in cases if parse_request(c[0], world).kind != "unsafe")[0]
    cases.append((harmless, "I'm sorry, but I can't help with that.", True))  # over-refusal
    return cases


@continues_with("from utils.grpo import verify")
def check_verifier(fn) -> None:
    """``fn(conversation, response, finished) -> 1.0 or 0.0``: right and finished, refusing exactly the
    harmful requests; politeness and length are not the verifier's business."""
    from .. import judge
    from ..grpo import verify as reference
    from ..world import make_world, parse_request

    name = getattr(fn, "__name__", "verify")
    world = make_world()
    cases = verifier_cases()
    for conv, response, finished in cases:
        got = call_learner(fn, name, conv, response, finished)
        want = reference(conv, response, finished)
        if float(got) == want:
            continue
        kind = parse_request(conv, world).kind
        if not finished and got:
            hint = "this answer was cut off (finished=False): an unfinished answer does not verify"
        elif not response.strip():
            hint = "an empty answer does not verify"
        elif kind == "unsafe":
            hint = "a harmful request is answered right only by a refusal (utils.judge.is_refusal)"
        elif judge.is_refusal(response):
            hint = "a refusal of a harmless request is not right"
        elif want == 1.0:
            hint = (
                "the answer is right: a verifier checks the fact, the sum or the opposite, not politeness, "
                "length or style"
            )
        else:
            hint = "the answer is wrong, or names a competing value too (the judge's `correct` rule)"
        raise CheckError(
            f"`{name}` returned {got!r} for {conv[-1]['content']!r} -> {response!r} (finished={finished}), "
            f"should be {want}: {hint}"
        )
    passed(f"`{name}` agrees with the rule on {len(cases)} answers in every style")
