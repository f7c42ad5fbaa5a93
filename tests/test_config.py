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


# ---- serving.arms: side-by-side variants ------------------------------------------------------------------
def _arms(*arms) -> dict:
    return {"arms": list(arms)}


def test_arms_validate_names_shares_and_learn_from():
    ok = load_config(env={}, serving=_arms({"name": "a", "share": 0.7}, {"name": "b", "share": 0.3,
                                                                          "learn_from": "own"},
                                          {"name": "s", "shadow": True}))
    assert [a.name for a in ok.serving.arms] == ["a", "b", "s"]
    # shares of 1/3 each sum to 1 within the tolerance
    load_config(env={}, serving=_arms(*({"name": f"t{i}", "share": 1 / 3} for i in range(3))))
    bad = [
        (_arms({"name": "a b", "share": 1.0}), "name must be"),
        (_arms({"name": "../x", "share": 1.0}), "name must be"),
        (_arms({"name": "a", "share": 0.5}, {"name": "a", "share": 0.5}), "unique, 'a' repeated"),
        (_arms({"name": "a", "share": 0.6}, {"name": "b", "share": 0.6}), r"sum to 1, got 1.2 \(a=0.6, b=0.6\)"),
        (_arms({"name": "a", "share": 1.5}), "share 1.5 must be in"),
        (_arms({"name": "a", "share": -0.1}, {"name": "b", "share": 1.1}), "share -0.1"),
        (_arms({"name": "s", "shadow": True}), "sum to 1, got 0"),  # nobody serves
        (_arms({"name": "a", "share": 1.0, "learn_from": "some"}), "learn_from 'some' must be one of all, own"),
        (_arms({"name": "a", "share": 1.0}, {"name": "s", "shadow": True, "learn_from": "own"}), "shadow arm"),
        ({"arms": []}, "at least one arm"),
    ]
    for serving, msg in bad:
        with pytest.raises(ConfigError, match=msg):
            load_config(env={}, serving=serving)
    # a shadow arm's share does not count
    load_config(env={}, serving=_arms({"name": "a", "share": 1.0}, {"name": "s", "share": 0.5, "shadow": True}))


def test_arm_trainer_overrides_are_checked():
    with pytest.raises(ConfigError, match=r"arm 'b'.*trainer\.lr_dence is not a trainer setting"):
        load_config(env={}, serving=_arms({"name": "a", "share": 0.5},
                                          {"name": "b", "share": 0.5, "trainer": {"lr_dence": 0.1}}))
    with pytest.raises(ConfigError, match=r"arm 'b'.*batch_size"):
        load_config(env={}, serving=_arms({"name": "a", "share": 0.5},
                                          {"name": "b", "share": 0.5, "trainer": {"batch_size": "big"}}))
    with pytest.raises(ConfigError, match=r"arm 'b'.*fiited"):
        load_config(env={}, serving=_arms({"name": "a", "share": 0.5},
                                          {"name": "b", "share": 0.5, "trainer": {"fiited": {"budgt": 0.3}}}))
    with pytest.raises(ConfigError, match=r"arm 'b'.*trainer\.arm is set by the arm"):
        load_config(env={}, serving=_arms({"name": "a", "share": 0.5},
                                          {"name": "b", "share": 0.5, "trainer": {"arm": "a"}}))
    with pytest.raises(ConfigError, match="trainer.learn_from 'mine'"):
        load_config(env={"STREAMREC_TRAINER__LEARN_FROM": "mine"})


def test_arm_trainer_config(tmp_path):
    from config import arm_trainer_config

    cfg = load_config(env={}, data_dir=str(tmp_path), trainer={"checkpoint_dir": str(tmp_path / "ck"),
                                                               "fiited": {"budget": 0.5}, "batch_size": 64},
                      serving=_arms({"name": "control", "share": 0.95},
                                    {"name": "big", "share": 0.05, "learn_from": "own",
                                     "trainer": {"embedding_dim": 32, "fiited": {"decay": 0.25}}}))
    control, big = arm_trainer_config(cfg, "control"), arm_trainer_config(cfg, cfg.serving.arms[1])
    assert control.trainer.arm == "control" and control.trainer.learn_from == "all"
    assert big.trainer.arm == "big" and big.trainer.learn_from == "own"
    assert big.trainer.embedding_dim == 32 and control.trainer.embedding_dim == 16
    assert big.trainer.batch_size == 64 == control.trainer.batch_size  # the base section under the overrides
    assert (big.trainer.fiited.budget, big.trainer.fiited.decay) == (0.5, 0.25)  # nested overrides merge
    assert control.trainer.checkpoint_dir == str(tmp_path / "ck" / "control")
    assert big.trainer.checkpoint_dir == str(tmp_path / "ck" / "big")
    assert big.trainer.publish_dir == str(tmp_path / "models" / "big")
    assert big.kafka == cfg.kafka and big.serving == cfg.serving  # only the trainer section differs
    # the single default arm keeps today's checkpoints (they resume), and publishes under models/main
    one = load_config(env={}, data_dir=str(tmp_path), trainer={"checkpoint_dir": str(tmp_path / "ck")})
    main = arm_trainer_config(one, "main").trainer
    assert main.checkpoint_dir == str(tmp_path / "ck") and main.publish_dir == str(tmp_path / "models" / "main")
    # an arm's explicit directories win
    own = load_config(env={}, serving=_arms({"name": "a", "share": 1.0, "trainer": {"checkpoint_dir": "/c"}}))
    assert arm_trainer_config(own, "a").trainer.checkpoint_dir == "/c"
    with pytest.raises(KeyError, match="no arm 'zz'.*known: a"):
        arm_trainer_config(own, "zz")
