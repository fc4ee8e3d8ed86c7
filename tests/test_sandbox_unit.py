"""sandbox: the docker run line of the disposable server, and what it prints."""

from __future__ import annotations

from fabfile import sandbox


def test_run_line_is_the_checked_recipe_without_privileged():
    spec = sandbox.Spec(name="box", image="img", pubkey="/k.pub", ssh_port=2222,
                        http_port=8080, https_port=8443)
    argv = sandbox.run_argv(spec)
    line = " ".join(argv)
    for part in ("--cap-add SYS_ADMIN", "--cap-add NET_ADMIN", "--cap-add SYS_PTRACE",
                 "--cap-add DAC_READ_SEARCH",
                 "--security-opt seccomp=unconfined", "--security-opt apparmor=unconfined",
                 "--security-opt systempaths=unconfined", "--cgroupns=host",
                 "-v /sys/fs/cgroup:/sys/fs/cgroup:rw", "--tmpfs /run", "--tmpfs /run/lock",
                 "-v box-docker:/var/lib/docker", "-p 127.0.0.1:2222:22",
                 "-p 127.0.0.1:8443:443"):
        assert part in line
    assert "--privileged" not in argv
    assert argv[-2:] == ["img", "/lib/systemd/systemd"]
    # Published on loopback only.
    ports = [argv[i + 1] for i, a in enumerate(argv) if a == "-p"]
    assert all(p.startswith("127.0.0.1:") for p in ports)


def test_offline_sources_and_mounts():
    spec = sandbox.Spec(name="b", apt_repo="/srv/apt", wheelhouse="/w", network="n",
                        aliases=("maicivy.test",))
    line = " ".join(sandbox.run_argv(spec))
    assert f"-v /srv/apt:{sandbox.APT_REPO_MOUNT}:ro" in line
    assert f"-v /w:{sandbox.WHEELHOUSE_MOUNT}:ro" in line
    assert "--network n --network-alias maicivy.test" in line



def test_offline_apt_script_keeps_only_the_local_repository(tmp_path):
    import subprocess

    apt = tmp_path / "apt"
    (apt / "sources.list.d").mkdir(parents=True)
    (apt / "sources.list").write_text("deb http://deb.debian.org/debian bookworm main\n")
    (apt / "sources.list.d/debian.sources").write_text("Types: deb\n")
    (apt / "sources.list.d/maicivy-local.list").write_text("old\n")
    argv = sandbox.offline_apt_argv(str(apt))
    for _ in range(2):  # twice: the second run changes nothing more
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=30)
        assert (proc.returncode, proc.stdout, proc.stderr) == (0, "", "")
    assert sorted(str(p.relative_to(apt)) for p in apt.rglob("*") if p.is_file()) == [
        "sources.list.d/debian.sources.offline", "sources.list.d/maicivy-local.list",
        "sources.list.offline"]
    assert (apt / "sources.list.d/maicivy-local.list").read_text() == (
        f"deb [trusted=yes] file:{sandbox.APT_REPO_MOUNT} ./\n")
    proc = subprocess.run(sandbox.offline_apt_argv(str(tmp_path / "none")), capture_output=True,
                          text=True, timeout=30)
    assert proc.returncode == 1 and "none" in proc.stderr


def test_instructions_name_the_key_to_trust_and_the_fab_line():
    box = sandbox.Sandbox("b", 2201, 8080, 8443, "ssh-ed25519 AAAAkey")
    text = sandbox.instructions(box)
    assert "[127.0.0.1]:2201 ssh-ed25519 AAAAkey" in text
    assert "fab -H root@127.0.0.1:2201 provision" in text
    assert "sandbox.down --name b" in text
    assert sandbox.known_hosts_line(2201, "ssh-ed25519 AAAAkey comment") == \
        "[127.0.0.1]:2201 ssh-ed25519 AAAAkey"
