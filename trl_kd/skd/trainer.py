from __future__ import annotations

import textwrap

from ..kd.trainer import KDTrainer, Rollout
from ..sampler import SamplingParams, TopKRule
from .config import SpeculativeKDConfig


class SpeculativeKDTrainer(KDTrainer):
    r"""Speculative Knowledge Distillation (SKD).

    From *Speculative Knowledge Distillation: Bridging the Teacher-Student Gap Through Interleaved Sampling* (Xu et
    al., ICLR 2025, arXiv 2410.11325). The student proposes each response token; if the token is not among the
    teacher's top-K at that position, the teacher samples a replacement. Early in training most tokens are replaced
    (close to supervised KD on teacher outputs), later most are kept (close to on-policy KD), an implicit curriculum.
    The student is trained with forward KL on the resulting sequences.

    Sampling runs in blocks like speculative decoding
    ([`trl_kd.sampler.block_verify_sample`][trl_kd.sampler.block_verify_sample]): the student drafts `num_draft_tokens`
    tokens, the teacher scores them in one forward and the first rejected one is replaced. This is exactly the
    token-by-token algorithm of the paper, at a fraction of the teacher forwards.

    Where the paper and the official code differ, the paper is the default and the code is one field away
    ([`SpeculativeKDConfig`][trl_kd.SpeculativeKDConfig]'s `draft_sampling="teacher"`,
    `acceptance_test="fresh_sample"`, `acceptance_on="warped"`); the code's off-by-one loss slice and batch size of 1
    are not reproduced.

    Metrics logged besides [`KDTrainer`][trl_kd.KDTrainer]'s: `acceptance_rate` (kept drafted tokens / judged drafted
    tokens), `teacher_token_fraction` and its value by quarter of the response, and the sampler's counters `rollout/*`.

    Example:

    ```python
    from trl_kd import SpeculativeKDConfig, SpeculativeKDTrainer

    trainer = SpeculativeKDTrainer(
        model="google/gemma-2b-it",
        teacher_model="google/gemma-7b-it",
        args=SpeculativeKDConfig(output_dir="gemma-skd", acceptance_top_k=25),
        train_dataset=dataset,  # "prompt" [+ "completion"] or "messages"
    )
    trainer.train()
    ```
    """

    _tag_names = ["trl", "trl-kd", "distillation", "speculative-kd"]
    _name = "Speculative KD"
    _paper = {
        "title": "Speculative Knowledge Distillation: Bridging the Teacher-Student Gap Through Interleaved Sampling",
        "id": "2410.11325",
        # docstyle-ignore
        "citation": textwrap.dedent("""\
            @inproceedings{xu2025speculative,
                title        = {{Speculative Knowledge Distillation: Bridging the Teacher-Student Gap Through
                                 Interleaved Sampling}},
                author       = {Wenda Xu and Rujun Han and Zifeng Wang and Long T. Le and Dhruv Madeka and Lei Li and
                                William Yang Wang and Rishabh Agarwal and Chen-Yu Lee and Tomas Pfister},
                year         = 2025,
                booktitle    = {The Thirteenth International Conference on Learning Representations, {ICLR} 2025},
                url          = {https://arxiv.org/abs/2410.11325},
            }"""),
    }
    config_class = SpeculativeKDConfig
    position_buckets = 4

    @property
    def student_sampling_params(self) -> SamplingParams:
        """The drafting settings: the student's, or the teacher's with `draft_sampling="teacher"` (official code)."""
        if self.args.draft_sampling == "teacher":
            return self.teacher_sampling_params
        return super().student_sampling_params

    def rollout(self, prompt_ids: list[list[int]]) -> Rollout:
        """Interleaved sampling: student drafts, the teacher replaces drafted tokens outside its top-K."""
        rule = TopKRule(
            self.args.acceptance_top_k,
            on=self.args.acceptance_on,
            teacher_params=self.teacher_sampling_params,
            test=self.args.acceptance_test,
            student_params=self.student_sampling_params,
        )
        return self.teacher_in_the_loop_rollout(prompt_ids, rule, self.args.num_draft_tokens)
