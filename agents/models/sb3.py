"""A transformer features extractor, so Stable-Baselines3 algorithms run on SequenceGen-v0.

    from stable_baselines3 import PPO
    from agents.models.sb3 import SequenceFeaturesExtractor

    env = gym.make("SequenceGen-v0", task="dyck")
    model = PPO("MlpPolicy", env, policy_kwargs={
        "features_extractor_class": SequenceFeaturesExtractor,
        "features_extractor_kwargs": {
            "special": env.unwrapped.vocab.special, "width": 64, "layers": 2,
        },
        "share_features_extractor": True,
    })

SB3 hands the extractor the observation as floats (a Box of token ids padded with ``pad_id``);
the extractor reads them back as ids, runs a causal transformer over the live tokens and returns
the hidden state of the last one: the representation of the state, as the policy's own logits
would see it.
"""

from __future__ import annotations

from typing import Literal

import gymnasium as gym
import torch
from stable_baselines3.common.torch_layers import BaseFeaturesExtractor

from agents.models.policy import TransformerConfig, TransformerPolicy
from seqenv.vocab import SpecialIds


class SequenceFeaturesExtractor(BaseFeaturesExtractor):
    """Features of a token-id observation: a transformer's hidden state at the last live token.

    Args:
        observation_space: SequenceGen's ``Box(0, num_actions, (max_length,), int64)``.
        special: the special ids of the env's vocabulary (``env.unwrapped.vocab.special``);
            the observation space cannot tell which ids are ``<eos>``, ``<bkspc>`` and pad.
        width, layers, heads, positions: the transformer's shape (see ``TransformerConfig``).
    """

    def __init__(
        self,
        observation_space: gym.spaces.Box,
        special: SpecialIds,
        width: int = 64,
        layers: int = 2,
        heads: int = 2,
        positions: Literal["learned", "rotary"] = "learned",
    ) -> None:
        super().__init__(observation_space, features_dim=width)
        if not isinstance(special, SpecialIds):
            raise TypeError(
                "SequenceFeaturesExtractor needs special=env.unwrapped.vocab.special in "
                f"features_extractor_kwargs, got {type(special).__name__}"
            )
        if int(observation_space.high.flat[0]) != special.num_actions:
            raise ValueError(
                f"the observation space is for {int(observation_space.high.flat[0])} actions, "
                f"the special ids for {special.num_actions}"
            )
        self.special = special
        max_length = int(observation_space.shape[0])
        self.transformer = TransformerPolicy(
            self.special,
            TransformerConfig(
                num_layers=layers,
                width=width,
                num_heads=heads,
                context_length=max_length,
                positions=positions,
            ),
        )

    def forward(self, observations: torch.Tensor) -> torch.Tensor:
        """(B, width) features of (B, L) observations (SB3 passes them as floats)."""
        ids = observations.round().long()  # (B, L): SB3 passes the Box as floats
        B, L = ids.shape
        positions = torch.arange(L, device=ids.device).expand(B, L)  # (B, L)
        hidden = self.transformer.hidden_states(ids, positions)  # (B, L, C)
        last = ((ids != self.special.pad_id).sum(dim=1) - 1).clamp(min=0)  # (B,)
        return hidden[torch.arange(B, device=ids.device), last]  # (B, C)
