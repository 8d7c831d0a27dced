"""``fromage-gill index build`` opens exactly what its URL flags name: --allow-private-urls loopback and the private
ranges, --allow-link-local-urls link-local, cloud metadata never (issue 17, finding 4's flag)."""

from __future__ import annotations

import pytest

from fromage_gill import cli
from fromage_gill.commands import index as index_command
from fromage_gill.retrieve.addresses import address_refusal, resolve_checked


@pytest.fixture
def captured(monkeypatch):
    """Run ``index build`` up to build_index, capturing its FetchConfig (no model, no fetch)."""
    seen = {}

    class Report:
        out_dir, count, skipped, rate = "out", 0, [], 0.0

    def fake_build(pipeline, images, out, **kw):
        seen["fetch_config"] = kw["fetch_config"]
        return Report()

    import fromage_gill.retrieve as retrieve

    monkeypatch.setattr(index_command, "load_from_args", lambda args, **kw: None)
    monkeypatch.setattr(retrieve, "build_index", fake_build)
    return seen


@pytest.mark.parametrize(
    ("flags", "private", "link_local"),
    [
        ([], False, False),
        (["--allow-private-urls"], True, False),
        (["--allow-link-local-urls"], False, True),
        (["--allow-private-urls", "--allow-link-local-urls"], True, True),
    ],
)
def test_each_flag_opens_its_own_ranges(captured, flags, private, link_local, tmp_path, capsys):
    argv = ["index", "build", "--model", "tiny-fromage", "--images", "urls.txt", "--out", str(tmp_path / "i")]
    assert cli.main([*argv, *flags]) == 0
    cfg = captured["fetch_config"]
    assert (cfg.allow_private, cfg.allow_link_local) == (private, link_local)
    allowed = {a: address_refusal(a, allow_private=private, allow_link_local=link_local) is None for a in ADDRESSES}
    assert allowed == {
        "10.1.2.3": private,
        "192.168.0.7": private,
        "127.0.0.1": private,
        "169.254.10.20": link_local,
        "fe80::1": link_local,
        "0.0.0.0": False,  # what --allow-private-urls used to open too
        "100.64.0.1": False,
        "169.254.169.254": False,
        "8.8.8.8": True,
    }


ADDRESSES = (
    "10.1.2.3",
    "192.168.0.7",
    "127.0.0.1",
    "169.254.10.20",
    "fe80::1",
    "0.0.0.0",
    "100.64.0.1",
    "169.254.169.254",
    "8.8.8.8",
)


def test_the_help_says_what_each_flag_opens(capsys):
    with pytest.raises(SystemExit):
        cli.main(["index", "build", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--allow-link-local-urls" in out and "169.254.0.0/16 and fe80::/10" in out
    assert "10.0.0.0/8, 172.16.0.0/12, 192.168.0.0/16 and fc00::/7" in out and "stay refused" in out


def test_a_link_local_refusal_names_the_flag():
    with pytest.raises(ValueError, match="link-local address.*--allow-link-local-urls"):
        resolve_checked("169.254.10.20", 80, allow_private=True)
