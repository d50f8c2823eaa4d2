"""The model card a trl-kd trainer writes: TRL's, with a "Distillation" section built from a `DistillationFacts`
value that the trainer fills."""

from __future__ import annotations

import os

from ..model_card import DistillationFacts, add_distillation_section, method_hyperparameters


class DistillationCard:
    """Model-card methods of [`KDTrainer`][trl_kd.KDTrainer] (a mixin before `trl.DistillationTrainer`). A method
    adds its own lines by overriding `model_card_sections`."""

    def create_model_card(self, model_name=None, dataset_name=None, tags=None):
        """TRL's model card, with the student's real base and a quick start that loads this model, plus a
        "Distillation" section before the citations: method, teacher and revision, dataset, hyperparameters,
        teacher-token fraction and acceptance, final evaluation, versions and the launch command."""
        super().create_model_card(model_name=model_name, dataset_name=dataset_name, tags=tags)
        if self.is_world_process_zero():
            facts = self.distillation_facts()
            facts.dataset = dataset_name or facts.dataset
            model_id = self.hub_model_id or self.args.hub_model_id or self.args.output_dir
            add_distillation_section(os.path.join(self.args.output_dir, "README.md"), facts, model_id)

    def distillation_facts(self) -> DistillationFacts:
        """What this run's model card says about the distillation (method, paper, teacher, student, steps,
        hyperparameters, log), as a plain value."""
        args = self.args
        cache = None if self.offline_teacher is None else self.offline_teacher.manifest
        if self.teacher_model is not None:
            teacher = self.accelerator.unwrap_model(self.teacher_model)
            teacher_id = args.teacher_model_name_or_path or teacher.config._name_or_path or "(in-memory model)"
            revision = args.teacher_model_revision or getattr(teacher.config, "_commit_hash", None)
        else:  # trained from an offline teacher cache alone
            teacher_id, revision = cache.teacher or "(in-memory model)", cache.teacher_revision
        return DistillationFacts(
            method=self._name,
            paper={key: self._paper[key] for key in ("id", "title")} if self._paper else None,
            teacher=teacher_id,
            teacher_revision=revision,
            student=self.accelerator.unwrap_model(self.model).config._name_or_path or None,
            steps=self.state.global_step,
            hyperparameters=method_hyperparameters(args),
            log_history=list(self.state.log_history),
            dataset=self.dataset_name,
            teacher_cache=None if cache is None else (cache.k, cache.temperature),
            extra_lines=self.model_card_sections(),
        )

    def model_card_sections(self) -> list[str]:
        """Extra markdown lines a method adds to its model card (e.g. PromptKD's teacher prompt)."""
        return []
