"""A user's mistake through the real `sftdag` command: one line, last on stderr, naming the key or
file and the reason; no traceback unless --verbose. Mistakes a look at the YAML and the files can
find are reported before any Dagster run starts (no instance is even created)."""

import dataclasses
import re

import dagster as dg
import pytest
import yaml

from trainer.core.config import DataConfig

from .test_cli import run_cli, write_experiment


def edit(path, change):
    config = yaml.safe_load(path.read_text())
    change(config)
    path.write_text(yaml.safe_dump(config))
    return path


def assert_one_line(proc, expected):
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode != 0, proc.stderr[-3000:]
    assert lines[-1] == expected, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "Stack Trace" not in proc.stderr, proc.stderr[-3000:]
    assert len(lines) < 15, proc.stderr[-3000:]
    return lines


DATA_KEYS = sorted(f.name for f in dataclasses.fields(DataConfig) if f.init)

# (what is wrong, how the YAML says it, the command, the last line of stderr)
BEFORE_RUN = [
    ("missing source file", lambda c: c["data"]["source"].update(path="nothere.jsonl"), "prepare",
     "sftdag: data.source.path: no file matches 'nothere.jsonl' (looked in {tmp}/nothere.jsonl)"),
    ("eval glob matching nothing", lambda c: c["data"].update(eval={"source": {"path": "heldout/*.jsonl"}}), "prepare",
     "sftdag: data.eval.source.path: no file matches 'heldout/*.jsonl' (looked in {tmp}/heldout/*.jsonl)"),
    ("unknown key", lambda c: c["data"].update(sorce={"path": "x.jsonl"}), "prepare",
     "sftdag: {yaml}: data: unknown key(s) ['sorce']; allowed: " + str(DATA_KEYS)),
    ("template file missing", lambda c: c["data"].update(template={"source": "templates/mine.jinja"}), "prepare",
     "sftdag: template.source 'templates/mine.jinja': not 'tokenizer', 'chatml' or an existing .jinja file "
     "({tmp}/templates/mine.jinja)"),
    ("tokenizer directory missing", lambda c: c["tokenizer"].update(path="./tokenizers/mine"), "prepare",
     "sftdag: tokenizer.path: no directory './tokenizers/mine' (looked in {tmp}/tokenizers/mine)"),
    ("formatting_func not importable",
     lambda c: c["data"].update(format="formatting_func", formatting_func="no_such_module_xyz:fmt"), "prepare",
     "sftdag: formatting_func 'no_such_module_xyz:fmt': cannot import module 'no_such_module_xyz': "
     "No module named 'no_such_module_xyz'"),
    ("loop prompts missing", lambda c: c.update(loop={"prompts": {"source": {"path": "prompts.jsonl"}}}), "loop",
     "sftdag: loop.prompts.source.path: no file matches 'prompts.jsonl' (looked in {tmp}/prompts.jsonl)"),
]


@pytest.mark.parametrize("change,command,expected", [case[1:] for case in BEFORE_RUN], ids=[c[0] for c in BEFORE_RUN])
def test_mistakes_found_before_a_run_are_one_line(tmp_path, change, command, expected):
    experiment = edit(write_experiment(tmp_path), change)
    proc = run_cli([command, str(experiment)], tmp_path)
    assert_one_line(proc, expected.format(tmp=tmp_path, yaml=experiment))
    assert not (tmp_path / "dagster_home").exists(), "no Dagster instance before the checks pass"


def test_malformed_yaml_is_its_position_and_problem(tmp_path):
    experiment = tmp_path / "broken.yaml"
    experiment.write_text("name: x\ndata:\n  source: {path: a.jsonl\n  max_length: 64\n")
    proc = run_cli(["prepare", str(experiment)], tmp_path)
    assert_one_line(proc, f"sftdag: {experiment}:4:13: invalid YAML: expected ',' or '}}', but got ':'")


def test_template_that_does_not_compile_names_its_file_and_line(tmp_path):
    experiment = edit(write_experiment(tmp_path), lambda c: c["data"].update(template={"source": "mine.jinja"}))
    (tmp_path / "mine.jinja").write_text("{% for m in messages %}\n{{ m.content }\n{% endfor %}\n")
    proc = run_cli(["prepare", str(experiment)], tmp_path)
    assert_one_line(proc, f"sftdag: data.template.source: {tmp_path}/mine.jinja:2: unexpected '}}'")
    assert not (tmp_path / "dagster_home").exists()


def test_verbose_shows_the_traceback_then_the_same_line(tmp_path):
    experiment = edit(write_experiment(tmp_path), lambda c: c["data"]["source"].update(path="nothere.jsonl"))
    proc = run_cli(["prepare", "--verbose", str(experiment)], tmp_path)
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "resolve_files" in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        f"sftdag: data.source.path: no file matches 'nothere.jsonl' (looked in {tmp_path}/nothere.jsonl)")


FAILED_RUN = re.compile(r"sftdag: Dagster run ([0-9a-f-]{36}) failed in step cli_data__raw_dataset "
                        r"\(full logs: `sftdag ui`, or run again with --verbose\)")


def test_error_inside_the_run_is_its_reason_and_the_run_keeps_the_full_error(tmp_path):
    """A JSON file (a list, not JSON lines) that does not parse is only found by reading it: the
    run fails, Dagster's console stays quiet, and the last line is the reason the step raised."""
    experiment = edit(write_experiment(tmp_path), lambda c: c["data"]["source"].update(path="data/train.json"))
    (tmp_path / "data" / "train.json").write_text('[{"prompt": "a", "completion": "b"},\n {oops}]\n')
    expected = (f"sftdag: {tmp_path}/data/train.json: invalid JSON at line 2: "
                "Expecting property name enclosed in double quotes")
    proc = run_cli(["prepare", str(experiment)], tmp_path)
    lines = assert_one_line(proc, expected)
    run_id = FAILED_RUN.fullmatch(lines[-2]).group(1)
    # The run's event log still holds the step's full error, stack included (the UI shows it).
    instance = dg.DagsterInstance.from_config(str(tmp_path / "dagster_home"))
    try:
        [failure] = [e for e in instance.all_logs(run_id) if e.dagster_event and e.dagster_event.is_step_failure]
        error = failure.dagster_event.step_failure_data.error
        assert error.cause.cls_name == "SourceError" and "invalid JSON" in error.cause.message and error.cause.stack
    finally:
        instance.dispose()

    verbose = run_cli(["prepare", str(experiment), "--verbose"], tmp_path)
    assert verbose.returncode != 0 and "Stack Trace" in verbose.stderr and "STEP_FAILURE" in verbose.stderr
    assert verbose.stderr.strip().splitlines()[-1] == expected


def test_a_selection_of_nothing_fails_the_run_with_the_key(tmp_path):
    experiment = edit(write_experiment(tmp_path), lambda c: c["data"]["source"].update(where={"task": "divide"}))
    proc = run_cli(["prepare", str(experiment)], tmp_path)
    lines = assert_one_line(proc, "sftdag: data.source.where: no record matches {'task': 'divide'} (30 records read)")
    assert FAILED_RUN.fullmatch(lines[-2])
