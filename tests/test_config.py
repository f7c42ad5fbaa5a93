import pytest

from config import Config, ConfigError, load_config, replace


def test_defaults_are_embedded():
    cfg = load_config(env={})
    assert cfg.kafka.bootstrap_servers == ""
    assert cfg.clickhouse_url().startswith("chdb:///")
    assert cfg.topics.partitions >= 1


def test_file_then_env_then_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("kafka: {bootstrap_servers: 'a:9092'}\ntrainer: {batch_size: 64, lr_dense: 0.5}\n")
    env = {"STREAMREC_TRAINER__BATCH_SIZE": "128", "STREAMREC_DATA_DIR": "/x", "STREAMREC_VENV": "ignored",
           "STREAMREC_METRICS__CLICKHOUSE_URL": "http://u:p@ch:8123"}
    cfg = load_config(f, env=env, trainer={"lr_dense": 0.25})
    assert cfg.kafka.bootstrap_servers == "a:9092"
    assert cfg.trainer.batch_size == 128 and cfg.trainer.lr_dense == 0.25
    assert cfg.data_dir == "/x"
    assert cfg.clickhouse_url() == "http://u:p@ch:8123"


def test_bad_values_name_the_field(tmp_path):
    with pytest.raises(ConfigError, match="batch_size"):
        load_config(env={"STREAMREC_TRAINER__BATCH_SIZE": "many"})
    with pytest.raises(ConfigError, match="bogus"):
        load_config(env={"STREAMREC_TRAINER__BOGUS": "1"})
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(bad, env={})


def test_replace_is_a_copy():
    cfg = Config()
    other = replace(cfg, trainer={"batch_size": 7})
    assert other.trainer.batch_size == 7 and cfg.trainer.batch_size != 7
    assert other.topics == cfg.topics


def test_config_structs_keep_constructor_small():
    # a frozen struct per component: every section is immutable.
    cfg = Config()
    with pytest.raises(AttributeError):
        cfg.trainer.batch_size = 1  # type: ignore[misc]
