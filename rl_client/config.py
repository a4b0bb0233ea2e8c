"""`warm-rl` configurations: every field is a flag of its command and a `WARM_RL_*` variable."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from rl_client.client import ClientConfig, FailurePolicy

_CLIENT = ClientConfig.model_fields  # the client's defaults, shared by the flags below


class _Command(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="WARM_RL_", cli_kebab_case=True, cli_implicit_flags=True, extra="forbid"
    )

    reward_url: str = Field(
        "http://127.0.0.1:8000", description="Base URL of the warm-serve reward endpoint."
    )
    api_key: SecretStr | None = Field(None, description="Bearer key of the reward endpoint.")
    expected_fingerprint: str | None = Field(
        None, description="Refuse to use a reward model with another fingerprint."
    )
    device: str = Field("auto", description="'auto' (CUDA when present), 'cpu', 'cuda:N'.")
    seed: int = Field(0, description="Seed of sampling (and of the prompt order).")


class TrainConfig(_Command):
    """`warm-rl train`: REINFORCE / RLOO with a KL penalty toward the initial policy."""

    model_config = SettingsConfigDict(cli_prog_name="warm-rl train")

    policy: Path = Field(description="Hugging Face causal-LM directory: the initial policy.")
    prompts: Path | None = Field(
        None,
        description="JSONL with a 'prompt' string or 'messages' list per line, or a text file "
        "with one prompt per line (default: a small built-in set).",
    )
    out: Path = Field(Path("runs/warm-rl"), description="Logs, checkpoints and the final policy.")
    control_url: str | None = Field(
        None,
        description="A second reward endpoint that is only logged, never optimised: a gap "
        "opening between the two rewards is the sign of reward hacking.",
    )
    steps: int = Field(100, ge=1, description="Policy updates.")
    prompts_per_step: int = Field(8, ge=1, description="Prompts (groups) per update.")
    group_size: int = Field(4, ge=1, description="Completions sampled per prompt (G).")
    max_new_tokens: int = Field(32, ge=1, description="Longest completion.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature.")
    lr: float = Field(1e-5, gt=0, description="AdamW learning rate.")
    kl_coef: float = Field(
        0.003,
        ge=0,
        description="alpha: reward - alpha * KL(policy || initial policy), k1 estimate per "
        "completion (the WARM paper: 0.003 with clean labels, 0.01 with corrupted ones).",
    )
    baseline: Literal["rloo", "none"] = Field(
        "rloo",
        description="'rloo': leave-one-out mean of the prompt's other completions (needs "
        "group_size >= 2); 'none': plain REINFORCE.",
    )
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm.")
    on_reward_failure: FailurePolicy = Field(
        "raise",
        description="After the client's retries: 'raise' stops the run (resume from the last "
        "checkpoint); 'none' trains on the completions that got a reward (a failed one has "
        "none, never 0).",
    )
    reward_timeout_s: float = Field(
        _CLIENT["timeout_s"].default, gt=0, description="Read timeout of one reward request."
    )
    reward_max_retries: int = Field(
        _CLIENT["max_retries"].default, ge=0, description="Retries of a failed reward request."
    )
    reward_backoff_base_s: float = Field(
        _CLIENT["backoff_base_s"].default, gt=0, description="First backoff; doubles per retry."
    )
    reward_backoff_max_s: float = Field(
        _CLIENT["backoff_max_s"].default, gt=0, description="Longest backoff between retries."
    )
    reward_max_concurrency: int = Field(
        _CLIENT["max_concurrency"].default, ge=1, description="Reward requests in flight."
    )
    save_every: int = Field(0, ge=0, description="Checkpoint every N steps (0: only at the end).")
    resume: bool = Field(True, description="Continue from the checkpoint in --out when present.")
    console: bool = Field(True, description="Print a table row per step.")

    @field_validator("on_reward_failure", mode="before")
    @classmethod
    def _older_word(cls, value: object) -> object:
        return "none" if value == "skip" else value  # the flag's earlier value, still taken

    def client_config(self) -> ClientConfig:
        """The reward client's settings: the endpoint, its key and pin, retries, concurrency
        and the failure policy."""
        return ClientConfig(
            base_url=self.reward_url,
            api_key=self.api_key,
            expected_fingerprint=self.expected_fingerprint,
            on_failure=self.on_reward_failure,
            timeout_s=self.reward_timeout_s,
            max_retries=self.reward_max_retries,
            backoff_base_s=self.reward_backoff_base_s,
            backoff_max_s=self.reward_backoff_max_s,
            max_concurrency=self.reward_max_concurrency,
        )


class BestOfNConfig(_Command):
    """`warm-rl best-of-n`: generate N candidates per prompt, keep the one the RM ranks first."""

    model_config = SettingsConfigDict(cli_prog_name="warm-rl best-of-n")

    prompts: Path = Field(
        description="JSONL: {'prompt': str} to generate candidates, or {'prompt': str, "
        "'candidates': [str, ...]} to rerank given ones; or a text file, one prompt per line."
    )
    policy: Path | None = Field(
        None, description="Hugging Face causal LM that generates candidates (when not given)."
    )
    n: int = Field(8, ge=1, description="Candidates generated per prompt.")
    max_new_tokens: int = Field(64, ge=1, description="Longest candidate.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass.")
    out: Path | None = Field(None, description="Write JSONL results here (default: stdout).")
