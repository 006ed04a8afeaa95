"""Config as pure unit tests: precedence, every kind of error, --print-config."""

import tomllib

import pytest

from sockserv.config import SETTINGS, Config, ConfigError, load_config, to_toml


@pytest.fixture
def toml_file(tmp_path):
    def write(text):
        path = tmp_path / "sockserv.toml"
        path.write_text(text)
        return str(path)

    return write


def test_defaults():
    config = load_config({}, environ={})
    assert (config.host, config.port, config.engine, config.proto) == ("127.0.0.1", 7007,
                                                                        "select", "tcp")
    assert config.max_connections > 1000  # from RLIMIT_NOFILE
    assert config.sources == {}


def test_port_default_follows_the_service():
    assert load_config({}, {}, service="push").port == 7070
    assert load_config({}, {}, service="echo").port == 7007


def test_max_connections_default_follows_the_engine():
    import resource

    assert Config(engine="fork").max_connections == 256
    assert Config(engine="thread").max_connections == 1000
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    assert Config(engine="select").max_connections == max(64, soft - 100)


def test_precedence_defaults_file_env_flags(toml_file):
    path = toml_file("port = 1001\nmax_line = 11\nidle_timeout = 1.5\nbacklog = 7\n")
    env = {"SOCKSERV_PORT": "1002", "SOCKSERV_MAX_LINE": "12"}
    config = load_config({"config": path, "port": "1003"}, env)
    assert (config.port, config.max_line, config.idle_timeout, config.backlog) == (1003, 12,
                                                                                   1.5, 7)
    assert config.sources["port"] == "--port"
    assert config.sources["max_line"] == "SOCKSERV_MAX_LINE"
    assert config.sources["idle_timeout"] == path
    assert "host" not in config.sources


def test_config_file_from_environment(toml_file):
    path = toml_file('engine = "fork"\n')
    assert load_config({}, {"SOCKSERV_CONFIG": path}).engine == "fork"


def test_booleans_parse_from_strings_and_toml(toml_file):
    assert load_config({}, {"SOCKSERV_ACCESS_LOG": "yes"}).access_log is True
    assert load_config({}, {"SOCKSERV_ACCESS_LOG": "off"}).access_log is False
    assert load_config({"config": toml_file("access_log = true\n")}, {}).access_log is True
    assert load_config({"access_log": True}, {}).access_log is True


@pytest.mark.parametrize("flags, env, message", [
    ({}, {"SOCKSERV_PORT": "70000"},
     "port: 70000 is out of range 0-65535 (from SOCKSERV_PORT)"),
    ({"port": "http"}, {}, "port: 'http' is not an integer (from --port)"),
    ({"engine": "tornado"}, {},
     "engine: 'tornado' is not one of select, thread, fork (from --engine)"),
    ({"proto": "sctp"}, {}, "proto: 'sctp' is not one of tcp, udp (from --proto)"),
    ({"idle_timeout": "-1"}, {}, "idle_timeout: -1.0 is out of range 0 or more"),
    ({"idle_timeout": "soon"}, {}, "idle_timeout: 'soon' is not a number of seconds"),
    ({}, {"SOCKSERV_ACCESS_LOG": "maybe"}, "access_log: 'maybe' is not a boolean"),
    ({"max_buffer": "10"}, {}, "max_buffer: 10 is out of range 1024-2147483648"),
    ({}, {"SOCKSERV_MAX_LINES": "5"},
     "unknown setting 'max_lines' in environment variable SOCKSERV_MAX_LINES; "
     "did you mean 'max_line'?"),
])
def test_bad_values_name_setting_value_and_source(flags, env, message):
    with pytest.raises(ConfigError) as info:
        load_config(flags, env)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_wrong_toml_type_names_the_file(toml_file):
    path = toml_file('port = "7007x"\n')
    with pytest.raises(ConfigError, match=rf"port: '7007x' is not an integer \(from {path}\)"):
        load_config({"config": path}, {})


def test_toml_bool_is_not_an_integer(toml_file):
    with pytest.raises(ConfigError, match="backlog: True is not an integer"):
        load_config({"config": toml_file("backlog = true\n")}, {})


def test_unknown_toml_key_is_named_with_a_suggestion(toml_file):
    path = toml_file("idle_timout = 3\n")
    with pytest.raises(ConfigError, match=f"unknown setting 'idle_timout' in {path}; "
                                          "did you mean 'idle_timeout'"):
        load_config({"config": path}, {})


def test_unknown_key_without_a_close_match_has_no_suggestion(toml_file):
    with pytest.raises(ConfigError) as info:
        load_config({"config": toml_file("zzz = 1\n")}, {})
    assert "did you mean" not in str(info.value)


def test_unreadable_and_invalid_files(tmp_path, toml_file):
    with pytest.raises(ConfigError, match="config: cannot read .*missing.toml"):
        load_config({"config": str(tmp_path / "missing.toml")}, {})
    with pytest.raises(ConfigError, match="is not valid TOML"):
        load_config({"config": toml_file("port = \n")}, {})
    with pytest.raises(ConfigError, match="cannot name another"):
        load_config({"config": toml_file('config = "x.toml"\n')}, {})


def test_direct_construction_validates():
    with pytest.raises(ConfigError, match="port: 99999 is out of range"):
        Config(port=99999)
    assert Config(port="0").port == 0


def test_replace_validates():
    config = Config()
    assert config.replace(max_line=5).max_line == 5
    with pytest.raises(ConfigError):
        config.replace(max_line=0)


def test_print_config_is_toml_with_sources_that_reads_back(toml_file):
    path = toml_file('host = "::1"\n')
    config = load_config({"config": path, "max_line": "99"}, {"SOCKSERV_ENGINE": "fork"},
                         service="echo")
    text = to_toml(config)
    assert 'host = "::1"  # ' + path in text
    assert "max_line = 99  # --max-line" in text
    assert 'engine = "fork"  # SOCKSERV_ENGINE' in text
    assert "port = 7007  # default" in text
    assert 'service = "echo"  # command line' in text
    assert f'# config = "{path}"' in text
    data = tomllib.loads(text)
    assert set(data) == set(SETTINGS) - {"config"}
    assert Config(**data, config=path) == config


def test_print_config_hides_passwords():
    config = load_config({"bus": "redis://user:s3cret@127.0.0.1:6379/2"},
                         {"SOCKSERV_BUS_PASSWORD": "hunter2"}, service="push")
    text = to_toml(config)
    assert "s3cret" not in text and "hunter2" not in text
    assert 'bus = "redis://user:***@127.0.0.1:6379/2"  # --bus' in text
    assert 'bus_password = "***"  # SOCKSERV_BUS_PASSWORD' in text
    assert config.bus_password == "hunter2"  # hidden in the output only


def test_every_setting_has_help_and_a_parser():
    for name, field in SETTINGS.items():
        assert field.metadata["help"], name
        assert callable(field.metadata["parse"]), name
