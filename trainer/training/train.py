"""Training entry point: `python -m trainer.training.train SPEC.json`, also under
`accelerate launch --multi_gpu --num_processes N -m trainer.training.train SPEC.json` (or `torchrun
--nproc_per_node N -m trainer.training.train SPEC.json`). On a machine without a GPU the same command runs
N CPU processes over gloo. Note: `accelerate launch --cpu --num_processes N` starts ONE process
(accelerate's simple launcher; it needs an MPI hostfile for more).

Runs where only torch, transformers, peft, accelerate and pyarrow (and pyyaml, a transformers
dependency) are installed: MLflow and Dagster Pipes are used when importable, never required.

The recipe reads top to bottom (`TrainingRun.run`): set up the tokenizer, the data, tracking and
the model; train; evaluate (the eval loss, the final sample table); save. SPEC.json is a
`TrainingSpec` and the result's `training_summary.json` a `TrainingSummary` (`trainer.training.spec`);
how the output directory is worked in, resumed and finished is `trainer.training.output`. Held-out
answers are scored elsewhere: the evaluation asset scores the merged model and its base
(`trainer.training.score`), on the first `training.accuracy_rows` held-out rows.

Batches: packed rows with restarting position_ids and a block-diagonal 4-D mask (see
`trainer.training.collate`); a batch without any trainable token raises `NoTrainableTokensError` naming its
dataset rows, and a non-finite loss raises `FloatingPointError` (Trainer would otherwise quietly
replace it). MLflow (rank 0): `experiment.tracking.mlflow_tracking_uri`, else
`sqlite:///<store>/mlflow.db` with artifacts in `<store>/mlartifacts` (see `trainer.training.tracking`).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path
from contextlib import nullcontext
from dataclasses import dataclass

from trainer.core.template_setup import load_template_setup
from trainer.training.arguments import training_arguments, use_cpu
from trainer.training.callbacks import PackedTrainer, ReportingCallback, TokenCounter, chunked_loss_unsupported
from trainer.training.collate import PackedCollator, PackedDataset, steps_per_epoch
from trainer.training.evaluate import load_held_out
from trainer.training.model_setup import base_vocab_size, build_trainable_model, check_mode_available
from trainer.training.base_model import resolve_base_model
from trainer.training.output import (
    COUNTERS_FILE, MODEL_CARD, checkpoint_step, finalize, is_finished, kept_checkpoints,
    last_checkpoint, model_card, partial_dir, remove_incomplete_checkpoints, result_files, save_model, training_lock,
)
from trainer.training.reporting import Reporter, close_mlflow_run_of, open_mlflow_run
from trainer.training.spec import SpecError, TrainingSpec, TrainingSummary
from trainer.core.schemas import TRAINING_SUMMARY


@dataclass
class Trained:
    global_step: int
    train_loss: float  # over the whole run, also when this session resumed
    runtime: float
    resumed_step: int


class TrainingRun:
    """One training, as the spec says. Every rank runs it; rank 0 reports and writes."""

    def __init__(self, spec: TrainingSpec):
        from accelerate import PartialState

        self.spec = spec
        self.experiment = spec.experiment
        self.settings = spec.experiment.training
        self.work = partial_dir(spec.output_dir)
        self.state = PartialState(cpu=use_cpu())
        self.is_main = self.state.is_main_process
        self.mlflow_run = None

    # -- the recipe ------------------------------------------------------------------------------
    def run(self) -> TrainingSummary:
        if self.spec.output_dir.exists():
            return self.report_already_complete()
        with Reporter(self.is_main) as self.reporter:
            try:
                check_mode_available(self.settings.mode)
                with training_lock(self.spec.output_dir) if self.is_main else nullcontext():
                    return self.run_locked()
            except BaseException:
                self.end_mlflow_run("FAILED")
                raise

    def run_locked(self) -> TrainingSummary:
        if self.spec.output_dir.exists():  # finished by another process while we waited to start
            return TrainingSummary.read(self.spec.output_dir)
        if is_finished(self.work):  # a previous run wrote its summary, then was stopped
            return self.complete_finished_work()
        self.prepare_work_dir()
        self.setup_tokenizer()
        self.setup_data()
        self.setup_tracking()
        self.setup_model()
        trainer, trained = self.train()
        eval_loss = self.evaluation_loss(trainer, trained.global_step)
        self.callback.log_samples(trainer.model, trained.global_step, name="final")
        summary = self.summarize(trained, eval_loss)
        self.save(trainer, summary)
        return summary

    # -- set-up ----------------------------------------------------------------------------------
    def prepare_work_dir(self) -> None:
        if self.is_main:
            self.work.mkdir(parents=True, exist_ok=True)
            for p in remove_incomplete_checkpoints(self.work):
                self.reporter.warning("removed incomplete checkpoint %s", p)
        self.state.wait_for_everyone()
        self.resume_from = last_checkpoint(self.work)

    def setup_tokenizer(self) -> None:
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(str(self.spec.tokenizer_dir))
        pad_id = self.tokenizer.pad_token_id
        self.pad_id = pad_id if pad_id is not None else self.tokenizer.eos_token_id
        if self.pad_id is None:
            raise SpecError(f"tokenizer in {self.spec.tokenizer_dir} has neither a pad nor an eos token")
        # The template set-up is read where the data stage stored it, with the tokenizer.
        self.template = load_template_setup(self.spec.tokenizer_dir)
        self.stop_tokens = [self.template.eot_token] if self.template.eot_token else []

    def setup_data(self) -> None:
        self.train_rows = PackedDataset(self.spec.train_shards)
        if len(self.train_rows) == 0:
            raise SpecError(f"no rows in the train shards {self.spec.train_shards}")
        eval_rows = PackedDataset(self.spec.eval_shards) if self.spec.eval_shards else None
        self.eval_rows = eval_rows if eval_rows is not None and len(eval_rows) else None
        held_out = load_held_out(self.spec.held_out) if self.spec.held_out else []
        self.sample_rows = held_out[: max(self.settings.sample_generations, 0)]

    def setup_tracking(self) -> None:
        if self.is_main:
            self.mlflow_run = open_mlflow_run(self.spec, self.work, self.reporter)

    def setup_model(self) -> None:
        from transformers import set_seed

        tc = self.settings
        set_seed(tc.seed)
        if self.spec.base_model:
            self.base_path = self.spec.base_model
        else:
            with self.state.main_process_first():
                self.base_path = resolve_base_model(self.experiment.model, self.experiment.store_root,
                                                    base_vocab_size(self.tokenizer, self.template.added_tokens),
                                                    self.experiment.base_dir)
        self.trainable = build_trainable_model(self.experiment, self.tokenizer, self.base_path,
                                               self.template.added_tokens, self.reporter, self.state.device)
        self.setup_precision_and_loss()
        self.steps_per_epoch = steps_per_epoch(len(self.train_rows), tc.per_device_train_batch_size,
                                               tc.gradient_accumulation_steps, self.state.num_processes)
        self.reporter.info(
            "training %s (%s) on %d packed rows: %d steps per epoch (batch %d x accumulation %d x %d processes), "
            "base model %s", self.experiment.name, tc.mode, len(self.train_rows), self.steps_per_epoch,
            tc.per_device_train_batch_size, tc.gradient_accumulation_steps, self.state.num_processes, self.base_path)

    def setup_precision_and_loss(self) -> None:
        """The precision this process trains in (`training.precision` resolved on this machine, as
        the adapter key has it), recorded in MLflow (`precision_resolved`) and the summary; and
        whether the loss can be chunked."""
        tc = self.settings
        self.precision = tc.resolved_precision()
        if self.state.device.type == "cpu":  # a process on the CPU of a GPU machine: fp16 refused here too
            tc.check_precision_on("cpu")
        self.reporter.info("precision %s (training.precision %s, on %s)", self.precision, tc.precision,
                           self.state.device.type)
        if self.mlflow_run is not None:
            self.mlflow_run.log_params({"precision_resolved": self.precision})
        self.loss_chunk_tokens = tc.loss_chunk_tokens
        unsupported = chunked_loss_unsupported(self.trainable.model) if self.loss_chunk_tokens else None
        if unsupported:
            self.reporter.info("training.loss_chunk_tokens: the model's own loss instead: %s", unsupported)
            self.loss_chunk_tokens = 0

    # -- evaluation ------------------------------------------------------------------------------
    def evaluation_loss(self, trainer, global_step: int) -> float | None:
        if self.eval_rows is None:
            return None
        evaluations = [e for e in trainer.state.log_history if "eval_loss" in e]
        if evaluations and evaluations[-1].get("step") == global_step:
            return evaluations[-1]["eval_loss"]
        return trainer.evaluate().get("eval_loss")

    # -- training --------------------------------------------------------------------------------
    def train(self) -> tuple[PackedTrainer, Trained]:
        tc = self.settings
        counter = TokenCounter(self.state.device)
        resumed_step = 0
        if self.resume_from is not None:
            resumed_step = checkpoint_step(self.resume_from)
            self.reporter.info("resuming from %s (global step %d)", self.resume_from.name, resumed_step)
            if not counter.load(self.resume_from / COUNTERS_FILE):
                self.reporter.warning("%s has no token counters; counting from zero", self.resume_from.name)
        self.counter = counter
        self.callback = ReportingCallback(
            reporter=self.reporter, mlflow_run=self.mlflow_run, counter=counter, tokenizer=self.tokenizer,
            samples=self.sample_rows, stop_tokens=self.stop_tokens, max_new_tokens=tc.max_new_tokens,
            sample_strategy=tc.eval_strategy, sample_steps=tc.eval_steps or tc.logging_steps,
            has_eval=self.eval_rows is not None)
        trainer = PackedTrainer(
            model=self.trainable.model,
            args=training_arguments(self.experiment, self.work, self.eval_rows is not None, device=self.state.device,
                                    precision=self.precision),
            train_dataset=self.train_rows, eval_dataset=self.eval_rows, data_collator=PackedCollator(self.pad_id),
            processing_class=self.tokenizer, callbacks=[self.callback], token_counter=counter,
            loss_chunk_tokens=self.loss_chunk_tokens)
        started = time.time()
        output = trainer.train(resume_from_checkpoint=str(self.resume_from) if self.resume_from else None)
        runtime = time.time() - started
        global_step = trainer.state.global_step
        epochs = tc.num_train_epochs
        if tc.max_steps <= 0 and float(epochs).is_integer() and global_step != self.steps_per_epoch * int(epochs):
            self.reporter.warning("Trainer ran %d steps; %d epochs x %d steps per epoch were expected",
                                  global_step, int(epochs), self.steps_per_epoch)
        train_loss = _full_train_loss(trainer.state.log_history, global_step, resumed_step, float(output.training_loss))
        return trainer, Trained(global_step, train_loss, runtime, resumed_step)

    # -- output ----------------------------------------------------------------------------------
    def summarize(self, trained: Trained, eval_loss) -> TrainingSummary:
        run = self.mlflow_run
        return TrainingSummary(
            experiment=self.experiment.name, mode=self.settings.mode, output_dir=str(self.spec.output_dir),
            base_model=self.experiment.model.base, base_model_path=str(self.base_path),
            mlflow_run_id=run.run_id if run is not None else None,
            mlflow_tracking_uri=run.tracking_uri if run is not None else None,
            global_step=trained.global_step, steps_per_epoch=self.steps_per_epoch, train_rows=len(self.train_rows),
            world_size=self.state.num_processes, train_loss=trained.train_loss, eval_loss=eval_loss,
            trainable_tokens=self.counter.trainable_tokens, tokens=self.counter.tokens, train_runtime=trained.runtime,
            resumed_from_step=trained.resumed_step or None, vocab_size=len(self.tokenizer),
            base_vocab_rows=self.trainable.base_rows, new_token_ids=self.trainable.new_token_ids,
            eot_token=self.template.eot_token, tags=dict(self.spec.tags), precision=self.precision,
            peak_rss_gb=peak_rss_gb(), peak_gpu_gb=peak_gpu_gb(self.state.device),
            # another machine's ranks have no work dir (rank 0 alone writes the result)
            checkpoints=kept_checkpoints(self.work) if self.settings.keep_checkpoints and self.work.is_dir() else [])

    def save(self, trainer, summary: TrainingSummary) -> None:
        """Model, tokenizer, card, MLflow artifacts; then the summary (which marks the work
        finished); then the rename into place."""
        save_model(trainer, self.work, summary.new_token_ids, self.is_main)
        if self.is_main:
            self.tokenizer.save_pretrained(str(self.work))
            (self.work / MODEL_CARD).write_text(model_card(self.experiment, self.template, summary, self.spec))
            self.log_result_to_mlflow(summary)
            summary.write(self.work)
            self.end_mlflow_run("FINISHED")
            finalize(self.work, self.spec.output_dir)
            self.reporter.info("training complete: %s (step %d, train loss %.4f)", self.spec.output_dir,
                               summary.global_step, summary.train_loss)
            self.reporter.materialization({**summary.scalars(), "output_dir": str(self.spec.output_dir)},
                                          self.spec.tags.get("adapter_version"))
        self.state.wait_for_everyone()

    def log_result_to_mlflow(self, summary: TrainingSummary) -> None:
        run = self.mlflow_run
        if run is None:
            return
        try:
            run.log_metrics({k: v for k, v in summary.scalars().items()
                             if k in ("train_loss", "trainable_tokens", "train_runtime", "peak_rss_gb", "peak_gpu_gb")},
                            step=summary.global_step)
            artifacts = "adapter" if self.settings.mode != "full" else "model"
            for p in result_files(self.work):
                if p.is_dir():
                    run.log_artifacts(p, f"{artifacts}/{p.name}")
                else:
                    run.log_artifact(p, artifacts)
        except Exception as e:  # tracking must never stop the save
            self.reporter.warning("MLflow artifact logging failed: %s", e)

    def end_mlflow_run(self, status: str) -> None:
        if self.mlflow_run is None:
            return
        try:
            if status == "FINISHED":
                self.mlflow_run.log_artifact(self.work / TRAINING_SUMMARY)
            self.mlflow_run.end(status)
        except Exception as e:  # tracking must never fail a training that worked
            self.reporter.warning("MLflow: %s", e)
        self.mlflow_run = None

    def complete_finished_work(self) -> TrainingSummary:
        if self.is_main:
            self.reporter.info("%s holds a finished run; completing it", self.work)
            close_mlflow_run_of(self.work, self.experiment, self.reporter)
            finalize(self.work, self.spec.output_dir)
        self.state.wait_for_everyone()
        return TrainingSummary.read(self.spec.output_dir)

    def report_already_complete(self) -> TrainingSummary:
        summary = TrainingSummary.read(self.spec.output_dir)
        if self.is_main:
            print(f"sftdag: {self.spec.output_dir} is already complete; not training again", flush=True)
            with Reporter(True) as reporter:
                reporter.info("%s is already complete (step %s); not training again", self.spec.output_dir,
                              summary.global_step)
                reporter.materialization({**summary.scalars(), "output_dir": str(self.spec.output_dir), "cached": True},
                                         self.spec.tags.get("adapter_version"))
        return summary


def _full_train_loss(log_history: list[dict], global_step: int, resumed_step: int, session_loss: float) -> float:
    """Mean loss over the whole run, also when this session resumed after `resumed_step` steps."""
    if not resumed_step:
        return session_loss
    total, steps, prev = 0.0, 0, 0
    for entry in log_history:
        if "loss" in entry and "step" in entry and entry["step"] <= resumed_step:
            total += entry["loss"] * (entry["step"] - prev)
            steps += entry["step"] - prev
            prev = entry["step"]
    if steps == 0:
        return session_loss
    session_steps = global_step - resumed_step
    return (total + session_loss * session_steps) / (steps + session_steps)


def peak_rss_gb() -> float:
    """This process's peak resident memory so far, in GB (ru_maxrss: kilobytes on Linux, bytes on macOS)."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (1e9 if sys.platform == "darwin" else 1e6), 3)


def peak_gpu_gb(device) -> float | None:
    """The most this process's tensors held on its GPU, in GB; None off a GPU."""
    import torch

    return round(torch.cuda.max_memory_allocated(device) / 1e9, 3) if device.type == "cuda" else None


def run_training(spec: str | os.PathLike | dict | TrainingSpec) -> TrainingSummary:
    """Train as the spec says (a path to SPEC.json, its dict, or a TrainingSpec); returns the
    summary on every rank."""
    return TrainingRun(TrainingSpec.load(spec)).run()


def main(argv: list[str] | None = None) -> int:
    from trainer.core.entry_point import die_with_parent

    die_with_parent()  # a SIGKILLed sftdag must not leave this process training (holding the GPU)
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) != 1 or argv[0] in ("-h", "--help"):
        print("usage: python -m trainer.training.train SPEC.json   "
              "(or: accelerate launch -m trainer.training.train SPEC.json)", file=sys.stderr)
        return 2
    rank = os.environ.get("RANK", "0")
    logging.basicConfig(level=logging.INFO if rank == "0" else logging.WARNING,
                        format=f"%(asctime)s [rank {rank}] %(name)s: %(message)s")
    from trainer.core.entry_point import failure_recorded

    with failure_recorded(Path(argv[0])):
        run_training(argv[0])
    return 0


if __name__ == "__main__":
    sys.exit(main())
