"""The master's control plane on its own: a dict for shared memory, no fork."""

from __future__ import annotations

from dataclasses import replace

import pytest

from prefork_smtpd.config_file import ConfigFileError
from prefork_smtpd.controlplane import ControlPlane
from prefork_smtpd.settings import PARAMETERS, SHARED, Settings


class Block(dict):
    def set(self, name, value):
        self[name] = value


def settings(**values):
    sources = {name: "file" for name in values}
    return Settings(workers=2, hostname="h", sources=sources, **values)


class Rig:
    """A control plane with a fake block, a log, a workers hook and a config "file"."""

    def __init__(self, **file_values):
        self.file = dict(file_values)
        self.logged = []
        self.workers_asked = []
        self.block = Block()
        self.plane = ControlPlane(
            settings(**self.file), self.reread, self.logged.append, {"workers": self.set_workers},
        )
        self.plane.attach(self.block)

    def reread(self):
        if self.file.get("broken"):
            raise ConfigFileError("s.toml:1: broken")
        return settings(**self.file)

    def set_workers(self, count):  # what the master does: the pool, then the block
        self.workers_asked.append(count)
        self.block.set("workers", count)

    def reload(self):
        self.plane.adopt(self.plane.reread())


def test_attach_publishes_every_shared_setting():
    rig = Rig(max_recipients=7, max_text_line=2000)
    assert set(rig.block) == set(SHARED)
    assert rig.block["max_recipients"] == 7 and rig.block["max_text_line"] == 2000 and rig.block["workers"] == 2


def test_a_live_change_is_written_to_the_block_logged_and_shown_as_live():
    rig = Rig()
    assert rig.plane.apply("max_recipients", 9) is None
    assert rig.block["max_recipients"] == 9 and rig.plane.settings.max_recipients == 9
    assert rig.logged == ["config: max_recipients=9"]
    assert rig.plane.live_values()["max_recipients"] == (9, "live")


def test_a_refused_change_changes_nothing_and_says_why():
    rig = Rig()
    before = dict(rig.block)
    assert rig.plane.apply("max_recipients", 0) == "max_recipients must be between 1 and 100000"
    assert rig.plane.apply("workers", 129) == "workers must be between 1 and 128"
    assert rig.plane.apply("max_text_line", 2000) == "unknown parameter max_text_line"  # shared, not live
    assert rig.plane.apply("colour", 1) == "unknown parameter colour"
    assert rig.block == before and rig.logged == [] and rig.workers_asked == [] and not rig.plane.live


def test_workers_go_through_the_hook():
    rig = Rig()
    assert rig.plane.apply("workers", 5) is None
    assert rig.workers_asked == [5] and rig.block["workers"] == 5


def test_show_lists_every_parameter_in_order_with_its_source():
    rig = Rig(max_recipients=7)
    rig.plane.settings.sources["timeout"] = "flag"
    rig.block.set("workers", 3)  # TTIN: changed outside the port
    values = rig.plane.live_values()
    assert list(values) == list(PARAMETERS)
    assert values["max_recipients"] == (7, "file") and values["timeout"] == (300, "flag")
    assert values["max_errors"] == (20, "default") and values["workers"] == (3, "live")


def test_reload_keeps_a_live_value_whose_key_the_file_left_alone():
    rig = Rig(max_recipients=7, timeout=60)
    rig.plane.apply("max_recipients", 9)
    rig.file["timeout"] = 61
    rig.reload()
    assert rig.block["max_recipients"] == 9 and rig.plane.live_values()["max_recipients"] == (9, "live")
    assert rig.block["timeout"] == 61 and rig.plane.live_values()["timeout"] == (61, "file")


def test_reload_lets_a_changed_key_replace_the_live_value():
    rig = Rig(max_recipients=7)
    rig.plane.apply("max_recipients", 9)
    rig.file["max_recipients"] = 8
    rig.reload()
    assert rig.block["max_recipients"] == 8 and rig.plane.live_values()["max_recipients"] == (8, "file")
    assert "reload: max_recipients=8 from the config replaces the live 9" in rig.logged


def test_a_key_removed_from_the_file_goes_back_to_its_default():
    rig = Rig(max_recipients=7)
    rig.plane.apply("max_recipients", 9)
    del rig.file["max_recipients"]
    rig.reload()
    assert rig.plane.live_values()["max_recipients"] == (100, "default")


def test_reload_keeps_restart_only_settings():
    rig = Rig(port=2600)
    rig.file["port"] = 2601
    rig.file["max_requests"] = 5
    rig.reload()
    assert rig.plane.settings.port == 2600 and rig.plane.settings.max_requests == 5
    assert "reload: port changes only on restart; kept 2600" in rig.logged


def test_a_bad_file_raises_before_anything_changes():
    rig = Rig(max_recipients=7)
    before, settings_before = dict(rig.block), rig.plane.settings
    rig.file["broken"] = True
    with pytest.raises(ConfigFileError):
        rig.plane.reread()
    assert rig.block == before and rig.plane.settings is settings_before


def test_without_a_reread_a_reload_restores_the_configured_values():
    plane = ControlPlane(replace(settings(), max_errors=5))
    block = Block()
    plane.attach(block)
    plane.block.set("workers", 4)  # changed outside the port, like TTIN
    plane.apply("max_errors", 6)
    plane.adopt(plane.reread())
    assert block["max_errors"] == 6 and block["workers"] == 4  # live values survive
