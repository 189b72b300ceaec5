"""A user's mistake through the real `sftdag` command: one line, last on stderr, naming the key or
file and the reason; no traceback unless --verbose. Mistakes a look at the YAML and the files can
find are reported before any Dagster run starts (no instance is even created)."""

import csv
import dataclasses
import io
import json
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
    ("eval source reading a train file",
     lambda c: c["data"].update(eval={"source": {"path": "data/train.jsonl"}}), "prepare",
     "sftdag: data.eval.source.path: {tmp}/data/train.jsonl is also a file of data.source.path: the held-out rows "
     "would be trained on (data.eval.fraction holds rows of one source out)"),
    ("a file matched twice", lambda c: c["data"]["source"].update(path=["data/*.jsonl", "data/train.jsonl"]),
     "prepare", "sftdag: data.source.path: {tmp}/data/train.jsonl is matched by both 'data/*.jsonl' and "
                "'data/train.jsonl': its rows would be read twice; list each file once"),
    ("unknown key", lambda c: c["data"].update(sorce={"path": "x.jsonl"}), "prepare",
     "sftdag: {yaml}: data: unknown key(s) ['sorce']; allowed: " + str(DATA_KEYS)),
    ("template file missing", lambda c: c["data"].update(template={"source": "templates/mine.jinja"}), "prepare",
     "sftdag: template.source 'templates/mine.jinja': not 'tokenizer', 'chatml' or an existing .jinja file "
     "({tmp}/templates/mine.jinja)"),
    ("tokenizer directory missing", lambda c: c["tokenizer"].update(path="./tokenizers/mine"), "prepare",
     "sftdag: tokenizer.path: no directory './tokenizers/mine' (looked in {tmp}/tokenizers/mine)"),
    ("tokenizer directory without a tokenizer", lambda c: c["tokenizer"].update(path="data"), "prepare",
     "sftdag: tokenizer.path: 'data' is not a tokenizer folder: none of " + ", ".join(
         ["tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt", "merges.txt",
          "spiece.model", "sentencepiece.bpe.model", "tekken.json"]) + " in {tmp}/data"),
    ("model directory without a model", lambda c: c.update(model={"base": "data"}), "run",
     "sftdag: model.base: 'data' is not a model folder: none of config.json, adapter_config.json in {tmp}/data"),
    ("formatting_func not importable",
     lambda c: c["data"].update(format="formatting_func", formatting_func="no_such_module_xyz:fmt"), "prepare",
     "sftdag: formatting_func 'no_such_module_xyz:fmt': cannot import module 'no_such_module_xyz': "
     "No module named 'no_such_module_xyz'"),
    ("name with a dash", lambda c: c.update(name="my-experiment"), "prepare",
     "sftdag: {yaml}: name: 'my-experiment': use letters, digits and underscores (it names Dagster assets and jobs)"),
    ("name with a slash", lambda c: c.update(name="team/exp"), "prepare",
     "sftdag: {yaml}: name: 'team/exp': use letters, digits and underscores (it names Dagster assets and jobs)"),
    ("empty name", lambda c: c.update(name=""), "prepare", "sftdag: {yaml}: name: must not be empty"),
    ("data.name with a dash", lambda c: c["data"].update(name="my-data"), "prepare",
     "sftdag: {yaml}: data.name: 'my-data': use letters, digits and underscores (it names Dagster assets)"),
    ("init_adapter missing", lambda c: c.update(training={"lora": {"init_adapter": "adapters/old"}}), "run",
     "sftdag: training.lora.init_adapter: {tmp}/adapters/old: no adapter_config.json"),
    ("scorer not importable", lambda c: c.update(eval={"scorers": ["exact", {"verifier": "no_such_checks:verify"}]}),
     "run", "sftdag: eval.scorers[1].verifier 'no_such_checks:verify': cannot import: ModuleNotFoundError: "
            "No module named 'no_such_checks'"),
    ("promotion metric not a scorer", lambda c: c.update(eval={"scorers": ["exact"], "promote": {"metric": "bleu"}}),
     "run", "sftdag: eval.promote.metric: 'bleu' is neither one of the scorers ['exact'] nor held_out_loss"),
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


def test_yaml_that_is_not_utf8_names_the_byte(tmp_path):
    experiment = tmp_path / "latin1.yaml"
    experiment.write_bytes("name: x\ndata:\n  name: caf\u00e9\n".encode("latin-1"))
    proc = run_cli(["prepare", str(experiment)], tmp_path)
    assert_one_line(proc, f"sftdag: {experiment}: invalid UTF-8 at byte 25")


def test_loop_prompts_from_a_held_out_file_are_refused_before_the_loop(tmp_path):
    """The rounds train on their prompts' accepted samples: prompts read from the held-out source's
    file would train on what the rounds are scored on."""
    from trainer.core.config import load_experiment
    from trainer.data.sources import SourceError
    from trainer.loop.rounds import build_prompts
    from trainer.loop.settings import loop_config

    (tmp_path / "heldout").mkdir()
    (tmp_path / "heldout" / "eval.jsonl").write_text(json.dumps({"prompt": "1+1=", "completion": "2"}) + "\n")
    experiment = edit(write_experiment(tmp_path), lambda c: (
        c["data"].update(eval={"source": {"path": "heldout/eval.jsonl"}}),
        c.update(loop={"prompts": {"source": {"path": "heldout/*.jsonl"}}})))
    proc = run_cli(["loop", str(experiment)], tmp_path)
    assert_one_line(proc, f"sftdag: data.eval.source.path: {tmp_path}/heldout/eval.jsonl is also a file of "
                          "loop.prompts.source.path: the held-out rows would be trained on")
    assert not (tmp_path / "dagster_home").exists()
    exp = load_experiment(str(experiment))  # and where the round's prompts are prepared (a Dagster step)
    with pytest.raises(SourceError, match="is also a file of loop.prompts.source.path"):
        build_prompts(exp, loop_config(exp), tokenizer=None)


def test_a_folder_given_as_the_experiment(tmp_path):
    (tmp_path / "exp.yaml").mkdir()
    proc = run_cli(["prepare", "exp.yaml"], tmp_path)
    assert_one_line(proc, "sftdag: exp.yaml: is a folder, not an experiment YAML file")


@pytest.mark.parametrize("text,expected", [
    # A second `data:` silently replaced the first: the builtin data was prepared instead of the file.
    ("name: x\ndata:\n  source: {path: data/*.jsonl}\nstore: store\ndata:\n  source: {builtin: default}\n",
     "5: duplicate key 'data' (first at line 2)"),
    ("name: x\ndata:\n  source:\n    path: a.jsonl\n    split: train\n    path: b.jsonl\n",
     "6: duplicate key 'path' (first at line 4)"),
    ("name: x\ndata: {max_length: 64, max_length: 128}\n", "2: duplicate key 'max_length' (first at line 2)"),
], ids=["top level", "nested", "flow mapping"])
def test_a_key_given_twice_names_both_lines(tmp_path, text, expected):
    experiment = tmp_path / "exp.yaml"
    experiment.write_text(text)
    proc = run_cli(["prepare", str(experiment)], tmp_path)
    assert_one_line(proc, f"sftdag: {experiment}:{expected}")
    assert not (tmp_path / "dagster_home").exists()


def test_yaml_merge_keys_may_override_what_they_merge(tmp_path):
    from trainer.core.config import load_experiment

    experiment = tmp_path / "exp.yaml"
    experiment.write_text("name: x\ndata:\n  source:\n    <<: {path: a.jsonl, split: train}\n    split: test\n")
    assert load_experiment(experiment).data.source.split == "test"


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


def file_experiment(tmp_path, fmt):
    experiment = edit(write_experiment(tmp_path), lambda c: c["data"]["source"].update(path=f"data/train.{fmt}"))
    (tmp_path / "data" / "train.jsonl").unlink()
    return experiment


def prompt_rows(n=30):
    return [{"prompt": f"Add {i} and {i + 2}.", "completion": str(2 * i + 2)} for i in range(n)]


def rejects_of(experiment, tmp_path):
    from pipelines.cli import materialized_data
    from trainer.core.config import load_experiment
    from trainer.data.stages import read_rejects

    instance = dg.DagsterInstance.from_config(str(tmp_path / "dagster_home"))
    try:
        outputs = materialized_data(load_experiment(experiment), instance)
    finally:
        instance.dispose()
    return [(r["row_id"], r["reason"]) for r in read_rejects(outputs["raw/train"]).to_pylist()]


def write_csv(path, rows):
    buffer = io.StringIO(newline="")
    writer = csv.DictWriter(buffer, ["prompt", "completion"])
    writer.writeheader()
    writer.writerows(rows)
    path.write_bytes(buffer.getvalue().encode())


def test_csv_row_that_is_not_utf8_is_a_reject_naming_its_row_field_and_line(tmp_path):
    experiment = file_experiment(tmp_path, "csv")
    write_csv(tmp_path / "data" / "train.csv", prompt_rows())
    data = (tmp_path / "data" / "train.csv").read_bytes().split(b"\r\n")
    data[4] = b"Say caf\xe9," + data[4].split(b",", 1)[1]
    (tmp_path / "data" / "train.csv").write_bytes(b"\r\n".join(data))
    proc = run_cli(["prepare", str(experiment)], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["rows_in"] == 30 and summary["rejects"] == 1
    assert rejects_of(experiment, tmp_path) == [
        (3, "malformed record at train.csv[3]: invalid UTF-8 in field 'prompt' (line 5)")]


def test_csv_field_over_pythons_default_limit_is_read(tmp_path):
    experiment = file_experiment(tmp_path, "csv")
    rows = prompt_rows()
    rows[0]["completion"] = "long " * 40_000  # 200,000 characters: over csv's 131,072 (truncated to max_length)
    write_csv(tmp_path / "data" / "train.csv", rows)
    proc = run_cli(["prepare", str(experiment)], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["rows_in"] == 30 and summary["rejects"] == 0


def test_corrupt_parquet_file_fails_the_run_naming_the_file(tmp_path):
    experiment = file_experiment(tmp_path, "parquet")
    (tmp_path / "data" / "train.parquet").write_bytes(b"PAR1 not really parquet")
    proc = run_cli(["prepare", str(experiment)], tmp_path)
    lines = assert_one_line(proc, f"sftdag: {tmp_path}/data/train.parquet: not a readable Parquet file: Parquet magic "
                                  "bytes not found in footer. Either the file is corrupted or this is not a parquet file.")
    assert FAILED_RUN.fullmatch(lines[-2])


def test_parquet_string_that_is_not_utf8_is_a_reject_naming_its_row_and_column(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    experiment = file_experiment(tmp_path, "parquet")
    rows = prompt_rows()
    prompts = [r["prompt"].encode() for r in rows]
    prompts[7] = b"caf\xe9"
    offsets = pa.array([0] + [sum(map(len, prompts[:i + 1])) for i in range(len(prompts))], pa.int32())
    unchecked = pa.Array.from_buffers(pa.string(), len(prompts), [None, offsets.buffers()[1], pa.py_buffer(b"".join(prompts))])
    pq.write_table(pa.table({"prompt": unchecked, "completion": [r["completion"] for r in rows]}),
                   tmp_path / "data" / "train.parquet")
    proc = run_cli(["prepare", str(experiment)], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1])["rejects"] == 1
    assert rejects_of(experiment, tmp_path) == [
        (7, "malformed record at train.parquet[7]: invalid UTF-8 in column 'prompt'")]
