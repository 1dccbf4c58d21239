"""Checker cells: run a learner's function on several inputs and say what is wrong, in words.

Each ``check_*`` compares against the maintained library's computation where one exists, tries
edge cases, and - when the answer is wrong - recognises the common mistakes by recomputing them,
so the message names the bug ("you did not shift the labels") rather than just "mismatch".
A checker that passes prints one line; one that fails raises :class:`CheckError`, which a notebook
shows as its message alone (never the checker's source, which holds the reference solution). An
error inside the learner's own function shows the learner's frames only; a library error that
their return value causes inside the checker becomes a :class:`CheckError` (``core.learner_facing``).

Layout, in course order, over one small core (everything is re-exported here, so notebooks and
tests write ``from utils.checks import check_...``):

- ``core``: the framework - :class:`CheckError`, :func:`call_learner`, :func:`expect_tensor`,
  :func:`passed`, the loss verdict, and :func:`compare_with_trl_trainer`, the harness that
  compares a loss with a TRL trainer's on one real batch (used by Chapters 3, 4 and 5);
- ``ch1_pretraining``: the next-token loss, sampling the next token;
- ``ch2_sft``: labels, collation, the SFT loss, counting trainable parameters, a LoRA layer (vs
  ``peft``'s);
- ``ch3_rlhf``: the Bradley-Terry loss (vs ``trl.RewardTrainer``), per-token rewards, GAE,
  PPO's policy and value losses;
- ``ch4_dpo``: summed sequence log-probabilities, the DPO loss (vs ``trl.DPOTrainer``), the
  conservative DPO and IPO losses;
- ``ch5_orpo``: averaged log-probabilities, log odds, the ORPO loss (vs TRL's ``ORPOTrainer``), its
  probability-ratio variant;
- ``ch7_beyond``: GRPO's group advantages, the k3 KL estimator and its gradient on a small
  softmax, the GRPO loss (vs ``trl.GRPOTrainer``), the verifiable reward and an answer that
  games it;
- ``project2``: checkpoints for the learner's preference data, their block of the PPO loop and
  their reward-model and policy training; the win-rate matrix; the reference run beside theirs.
"""

from .ch1_pretraining import check_next_token_loss, check_sample_next_token
from .ch2_sft import (
    check_build_labels,
    check_collate,
    check_count_trainable,
    check_lora_linear,
    check_sft_loss,
)
from .ch3_rlhf import (
    check_bradley_terry_loss,
    check_gae,
    check_per_token_rewards,
    check_ppo_policy_loss,
    check_ppo_value_loss,
)
from .ch4_dpo import check_conservative_dpo_loss, check_dpo_loss, check_ipo_loss, check_sequence_logprobs
from .ch5_orpo import check_average_logprobs, check_log_odds, check_orpo_loss, check_probability_ratio_loss
from .ch7_beyond import (
    check_expected_k3_gradients,
    check_group_advantages,
    check_grpo_loss,
    check_kl_k3,
    check_loss_aggregations,
    check_verifier,
    check_verifier_hack,
)
from .core import (
    CheckError,
    call_learner,
    compare_with_trl_trainer,
    expect_tensor,
    passed,
)
from .project2 import (
    check_beta_choice,
    check_dpo_sweep,
    check_policy_run,
    check_preference_data,
    check_preference_pairs_run,
    check_reward_model_choice,
    check_reward_model_run,
    check_rlhf_advantages,
    check_win_rate_matrix,
    compare_with_reference,
)

__all__ = [
    "CheckError",
    "call_learner",
    "expect_tensor",
    "passed",
    "compare_with_trl_trainer",
    "check_next_token_loss",
    "check_sample_next_token",
    "check_build_labels",
    "check_collate",
    "check_sft_loss",
    "check_count_trainable",
    "check_lora_linear",
    "check_bradley_terry_loss",
    "check_per_token_rewards",
    "check_gae",
    "check_ppo_policy_loss",
    "check_ppo_value_loss",
    "check_sequence_logprobs",
    "check_dpo_loss",
    "check_conservative_dpo_loss",
    "check_ipo_loss",
    "check_average_logprobs",
    "check_log_odds",
    "check_orpo_loss",
    "check_probability_ratio_loss",
    "check_preference_data",
    "check_preference_pairs_run",
    "check_rlhf_advantages",
    "compare_with_reference",
    "check_reward_model_run",
    "check_reward_model_choice",
    "check_dpo_sweep",
    "check_beta_choice",
    "check_policy_run",
    "check_win_rate_matrix",
    "check_group_advantages",
    "check_kl_k3",
    "check_expected_k3_gradients",
    "check_grpo_loss",
    "check_loss_aggregations",
    "check_verifier",
    "check_verifier_hack",
]
