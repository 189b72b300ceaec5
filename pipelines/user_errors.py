"""A user's mistake as one line: what `sftdag` checks before starting a Dagster run, and the
reason a run failed, taken from the step's error in the run's event log."""

from __future__ import annotations

import builtins


def one_line(text: str) -> str:
    return " ".join(line.strip() for line in str(text).splitlines() if line.strip())


def load_checked(path: str, through: str):
    """The experiment, with what a run would read checked first (cheaply: no tokenizer or model
    is loaded): the YAML, the source files, the template file, the formatting function, local
    model and tokenizer directories and GGUF files. Any mistake is a ConfigError naming the key
    (or the file and line), not a failed run."""
    from trainer.core.config import ConfigError, load_experiment

    try:
        exp = load_experiment(path)
    except ConfigError as e:
        # yaml's own message spans lines (with a caret under the spot); its position and problem fit on one.
        mark, problem = getattr(e.__context__, "problem_mark", None), getattr(e.__context__, "problem", None)
        if mark is None or problem is None:
            raise
        raise ConfigError(f"{path}:{mark.line + 1}:{mark.column + 1}: invalid YAML: {problem}") from e.__context__
    _check_models(exp, through)
    _check_files(exp, through)
    _check_formatting(exp)
    _check_init_adapter(exp, through)
    _check_scoring(exp, through)
    return exp


def _check_models(exp, through: str) -> None:
    from trainer.core.config import ConfigError
    from trainer.models import gguf

    # A tokenizer taken from model.base (tokenizer.path not given) is named as model.base, the key the user wrote.
    named = {}
    if through != "data" or exp.tokenizer.path == exp.model.base:
        named[exp.model.base] = "model.base"
    named.setdefault(exp.tokenizer.path, "tokenizer.path")
    for value, key in named.items():
        if gguf.is_gguf_base(value):
            try:
                gguf.gguf_file(value, exp.base_dir)
            except gguf.GGUFError as e:
                raise ConfigError(f"{key}: {e}") from None
        elif not value.startswith("builtin:") and not exp.resolve_path(value).exists():
            # huggingface_hub imported only here: a cached `prepare` of local data never needs it
            from huggingface_hub.utils import HFValidationError, validate_repo_id

            try:  # not here, but maybe a Hugging Face hub id (loaded in the run, for users with network)
                validate_repo_id(value)
            except HFValidationError:
                raise ConfigError(f"{key}: no directory {value!r} (looked in {exp.resolve_path(value)})") from None
    _check_local_directories(exp, through)


# What transformers loads a model or a tokenizer from: a folder with none of these holds neither.
MODEL_FILES = ("config.json", "adapter_config.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                   "merges.txt", "spiece.model", "sentencepiece.bpe.model", "tekken.json")


def _check_local_directories(exp, through: str) -> None:
    """A local folder given as the model or the tokenizer holds its files (else transformers fails
    in the run with a message naming neither the key nor the folder)."""
    from trainer.core.config import ConfigError
    from trainer.models import gguf

    wanted = [("model.base", exp.model.base, MODEL_FILES, "a model")] if through != "data" else []
    tokenizer_key = "model.base" if exp.tokenizer.path == exp.model.base else "tokenizer.path"
    wanted.append((tokenizer_key, exp.tokenizer.path, TOKENIZER_FILES, "a tokenizer"))
    for key, value, files, what in wanted:
        if value.startswith("builtin:") or gguf.is_gguf_base(value):
            continue
        folder = exp.resolve_path(value)
        if folder.is_dir() and not any((folder / name).is_file() for name in files):
            raise ConfigError(f"{key}: {value!r} is not {what} folder: none of {', '.join(files)} in {folder}")


def _check_files(exp, through: str) -> None:
    from trainer.core.config import ConfigError
    from trainer.data.sources import SourceError, check_held_out_files, resolve_files
    from trainer.data.tokenizer_loading import resolve_template_source

    sources = [exp.data.source, exp.data.eval.source]
    if through == "round":
        from trainer.loop.settings import loop_config

        sources.append(loop_config(exp).prompts.source)
    for source in sources:
        if source is None or not source.path:
            continue  # builtin and hub sources are checked by the run (a hub needs the network)
        try:
            files = resolve_files(source, exp.base_dir)
        except SourceError as e:
            raise ConfigError(str(e)) from e
        for file in files:
            try:
                open(file, "rb").close()
            except OSError as e:
                raise ConfigError(f"{source.key}.path: cannot read {file}: {e.strerror}") from e
    if exp.data.eval.source is not None:
        trained = sources[:1] + sources[2:]  # the train source, and a loop's prompts (trained on their samples)
        try:
            for source in trained:
                check_held_out_files(source, exp.data.eval.source, exp.base_dir)
        except SourceError as e:
            raise ConfigError(str(e)) from e
    try:
        template = resolve_template_source(exp.data.template.source, exp.base_dir)
    except FileNotFoundError as e:
        raise ConfigError(str(e)) from e
    if exp.data.template.source not in ("tokenizer", "chatml"):
        # Compiled as transformers compiles it (its {% generation %} tag included): in the run, a
        # syntax error would only say "unexpected '}'", naming neither the setting nor the file.
        import jinja2

        from trainer.data.templating import compile_template
        from trainer.data.tokenizer_loading import read_template

        try:
            compile_template(read_template(template))
        except jinja2.TemplateSyntaxError as e:
            raise ConfigError(f"data.template.source: {template}:{e.lineno}: {e.message}") from e


def _check_init_adapter(exp, through: str) -> None:
    """The adapter `training.lora.init_adapter` continues (as `trainer.training.launch.init_adapter_identity`
    checks it when planning the training, with the same message)."""
    from trainer.core.config import ConfigError

    lora = exp.training.lora
    if through not in ("model", "round") or not lora.init_adapter or exp.training.mode == "full":
        return
    if through == "round":
        from trainer.loop.settings import loop_config

        if loop_config(exp).start_model is not None:  # no SFT: the rounds start from that model instead
            return
    path = exp.resolve_path(lora.init_adapter)
    if not (path / "adapter_config.json").is_file():
        raise ConfigError(f"training.lora.init_adapter: {path}: no adapter_config.json")


def _check_scoring(exp, through: str) -> None:
    """The scorers import (a verifier beside the YAML too) and `eval.promote.metric` names one of
    them, before anything is trained: a user's mistake in one line, never a failed run after training."""
    from trainer.core.config import ConfigError
    from trainer.training.scorers import experiment_scorers

    if through not in ("model", "round"):
        return
    ids = [s.id for s in experiment_scorers(exp)]  # ScorerError (a ConfigError) naming the scorer
    promote = exp.eval.promote
    if promote.enabled and promote.metric is not None and promote.metric not in ids + ["held_out_loss"]:
        raise ConfigError(f"eval.promote.metric: {promote.metric!r} is neither one of the scorers {ids} "
                          "nor held_out_loss")
    if promote.enabled and promote.registered_model is not None and not str(promote.registered_model).strip():
        raise ConfigError("eval.promote.registered_model: empty; leave it out to use the experiment's name")
    if promote.min_delta < 0:
        raise ConfigError(f"eval.promote.min_delta: must be >= 0, got {promote.min_delta}")


def _check_formatting(exp) -> None:
    from trainer.core.config import ConfigError
    from trainer.data.record_formats import load_formatting_func

    dotted = exp.data.formatting_func
    if not dotted:
        return
    try:
        load_formatting_func(dotted)
    except ValueError as e:  # its messages name the setting and what is missing
        raise ConfigError(str(e)) from e
    except Exception as e:  # the user's module itself fails to import (a syntax error, …)
        raise ConfigError(f"formatting_func {dotted!r}: importing it raised {type(e).__name__}: {one_line(e)}") from e


def failure_reason(event) -> str:
    """The reason a step failed: a `dg.Failure`'s own description (the one line an asset wrote for
    a user's mistake), else the message of the exception the step's code raised, else the event's."""
    data = event.step_failure_data if event.is_step_failure else None
    if data is None:
        return one_line(event.message)
    if data.user_failure_data is not None and data.user_failure_data.description:
        return one_line(data.user_failure_data.description)
    error = data.error
    # Dagster wraps what the step raised (DagsterExecutionStepExecutionError, …Handle/LoadInputError):
    # the first exception below its wrappers is the one the code raised, whose message names the key
    # or row. Deeper causes are lower-level detail (a KeyError it was raised from, the remote
    # traceback of a worker process).
    while error is not None and error.cls_name.startswith("Dagster") and (error.cause or error.context):
        error = error.cause or error.context
    if error is None:
        return one_line(event.message)
    # `message` is "module.Class: text"; a Python built-in other than the ValueError and OSError
    # families (which this project raises with a user's message) is a bug, and its name says more.
    head, sep, text = error.message.partition(": ")
    cls = getattr(builtins, error.cls_name, None)
    is_bug = isinstance(cls, type) and issubclass(cls, BaseException) and not issubclass(cls, (ValueError, OSError))
    if not sep or not head.endswith(error.cls_name) or is_bug or not text.strip():
        return one_line(error.message)
    return one_line(text)
