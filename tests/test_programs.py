"""Pure tests: which programs the preload transport reaches (worker/programs.py)."""
from __future__ import annotations

import os
import shutil
import sys

import pytest

from vpn_provider.worker.programs import why_not_preloaded


def test_a_dynamically_linked_program_and_a_script_through_env_are_reached(tmp_path):
    assert why_not_preloaded(sys.executable) == ""
    script = tmp_path / "job"
    script.write_text("#!/usr/bin/env python3\nprint(1)\n")
    assert why_not_preloaded(str(script)) == ""


@pytest.mark.skipif(not os.path.exists("/sbin/ldconfig"), reason="no /sbin/ldconfig, glibc's static program, here")
def test_a_static_program_and_a_script_it_interprets_are_not(tmp_path):
    assert why_not_preloaded("/sbin/ldconfig").startswith("statically linked")
    script = tmp_path / "job"
    script.write_text("#!/sbin/ldconfig\n")
    assert why_not_preloaded(str(script)).startswith("statically linked")


def test_set_user_id_programs_and_non_programs_are_not(tmp_path):
    copy = tmp_path / "suid"
    shutil.copy(sys.executable, copy)
    os.chmod(copy, 0o4755)
    assert why_not_preloaded(str(copy)).startswith("set-user-ID")
    text = tmp_path / "notes"
    text.write_text("hello")
    assert why_not_preloaded(str(text)) == "not a program (neither ELF nor a script)"
    assert why_not_preloaded(str(tmp_path / "absent")) == "cannot be read (No such file or directory)"
