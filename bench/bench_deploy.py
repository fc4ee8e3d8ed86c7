#!/usr/bin/env python3
"""Benchmarks of ``deploy`` on the rig, each against its baseline in the same run.

1. No-op redeploy: wall time of ``fab deploy`` (the real CLI) when nothing
   changed, and the number of remote commands it runs, against an Ansible
   playbook (bench/ansible/noop.yml, ansible-core from PyPI) that pushes the
   same rendered files and runs the same compose commands on the same SSH
   host. Target: at least 10x faster, at most 6 remote commands.
2. Downtime: failed requests through nginx at ~50 requests/s while the
   backend image changes, for our deploy and for the seed's deploy.sh
   sequence (pull, stop, start, wait for health). Target: 0 for ours.

Needs the rig (tests/rig/setup-docker.sh: dockerd, registry, test images),
OpenSSH's sshd, and ``pip install ansible-core``. Everything runs on
127.0.0.1; the stack and sshd are removed at the end.

    PYTHONPATH=tests .venv/bin/python bench/bench_deploy.py [--runs 5] [--only noop|downtime]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from conftest import start_sshd
from deploy_support import (
    ClientLoop,
    fab,
    get,
    remove_release_tags,
    write_config,
)
from stack_rig import StackRig

from fabfile.config import load_settings
from fabfile.host import Host, harden_connection, upload_if_changed
from fabfile.render import render_tree, write_tree
from fabfile.stack import compose, ensure_certificates, remote_files

ROOT = Path(__file__).resolve().parent.parent
os.environ["PATH"] = f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"

PROJECT = "maicivybenchdeploy"


def count_remote_commands(fn):
    """Run ``fn`` and count SSH exec requests and SFTP sessions it opens."""
    import paramiko

    counts = {"exec": 0, "sftp": 0}
    commands = []
    orig_exec, orig_sub = paramiko.Channel.exec_command, paramiko.Channel.invoke_subsystem

    def exec_command(self, command):
        counts["exec"] += 1
        commands.append(command.split("\n")[0][:90])
        return orig_exec(self, command)

    def invoke_subsystem(self, subsystem):
        counts["sftp"] += 1
        return orig_sub(self, subsystem)

    paramiko.Channel.exec_command = exec_command
    paramiko.Channel.invoke_subsystem = invoke_subsystem
    try:
        fn()
    finally:
        paramiko.Channel.exec_command = orig_exec
        paramiko.Channel.invoke_subsystem = orig_sub
    return counts, commands


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


class Bench:
    def __init__(self, work: Path):
        self.work = work
        self.ssh, self.sshd = start_sshd(work / "sshd")
        self.stack = StackRig(self.ssh, work, PROJECT, deploy={"health_timeout_seconds": 60})
        self.overrides = dict(self.stack.overrides)
        self.settings = self.stack.settings

    def config(self, name: str, **changes) -> Path:
        data = {k: (dict(v) if isinstance(v, dict) else v) for k, v in self.overrides.items()}
        for key, value in changes.items():
            data[key] = {**data[key], **value} if isinstance(value, dict) else value
        return write_config(self.work / f"{name}.yaml", data, [str(self.ssh.known_hosts)])

    def deploy(self, config: Path, *args: str):
        proc = fab(self.ssh, config, "deploy", *args)
        if proc.returncode:
            raise SystemExit(f"deploy failed:\n{proc.stdout}\n{proc.stderr}")
        return proc

    def setup(self):
        s = self.settings
        for d in (s.backup.dir, s.backup.textfile_dir, s.tls.webroot, s.root):
            self.stack.run(f"mkdir -p {d}")
        self.stack.write_env()
        ensure_certificates(Host(self.stack.conn), s)
        print("bringing the stack up with a first deploy ...", flush=True)
        self.deploy(self.config("v1"))
        # Some application data, for the pre-deploy backups.
        self.stack.run(self.stack.compose(
            "exec", "-T", "postgres", "sh", "-c",
            'psql -q -v ON_ERROR_STOP=1 -U "$POSTGRES_USER" -d "$POSTGRES_DB" -c '
            '"CREATE TABLE visits (id serial PRIMARY KEY); INSERT INTO visits DEFAULT VALUES;"'))

    def close(self):
        self.stack.down()
        remove_release_tags(PROJECT)
        self.sshd.terminate()
        self.sshd.wait(timeout=10)

    # --- 1. no-op redeploy vs Ansible -----------------------------------------------

    def noop(self, runs: int) -> dict:
        config = self.config("v1")
        ours = []
        for _ in range(runs):
            proc = None

            def run():
                nonlocal proc
                proc = self.deploy(config)

            ours.append(timed(run))
            assert "nothing changed" in proc.stdout, proc.stdout

        from fabfile.deploy.runner import deploy_host

        def in_process():
            conn = self.ssh.connection(self.overrides)
            harden_connection(conn, [str(self.ssh.known_hosts)])
            try:
                result = deploy_host(Host(conn), self.settings)
                assert result == "unchanged", result
            finally:
                conn.close()

        counts, commands = count_remote_commands(in_process)

        build = self.work / "ansible-src"
        write_tree(render_tree(self.settings), build)
        inventory = self.work / "inventory.ini"
        inventory.write_text(
            "[vps]\n"
            f"target ansible_host=127.0.0.1 ansible_port={self.ssh.port} "
            f"ansible_user={self.ssh.user} "
            f"ansible_ssh_private_key_file={self.ssh.client_key} "
            "ansible_python_interpreter=/usr/bin/python3 "
            f"ansible_ssh_common_args='-o UserKnownHostsFile={self.ssh.known_hosts} "
            "-o StrictHostKeyChecking=yes'\n")
        env = {**os.environ, "ANSIBLE_PIPELINING": "True", "ANSIBLE_HOST_KEY_CHECKING": "True",
               "ANSIBLE_NOCOLOR": "1", "ANSIBLE_RETRY_FILES_ENABLED": "False",
               "ANSIBLE_LOCAL_TEMP": str(self.work / "ansible-tmp")}
        argv = ["ansible-playbook", "-i", str(inventory), str(ROOT / "bench/ansible/noop.yml"),
                "-e", json.dumps({"src": f"{build}/", "root": self.settings.root,
                                  "compose": compose(self.settings)})]
        theirs = []
        for i in range(runs + 1):
            start = time.perf_counter()
            proc = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=self.work)
            took = time.perf_counter() - start
            if proc.returncode:
                raise SystemExit(f"ansible-playbook failed:\n{proc.stdout}\n{proc.stderr}")
            if i == 0:
                continue  # the first run may still copy (modes): not a no-op
            assert "changed=0" in proc.stdout, proc.stdout
            theirs.append(took)
        verbose = subprocess.run([*argv, "-vvv"], capture_output=True, text=True, env=env,
                                 cwd=self.work)
        ansible_execs = verbose.stdout.count("SSH: EXEC ")
        # Ansible did not change anything our deploy manages.
        again = count_remote_commands(in_process)[0]
        return {"ours": ours, "theirs": theirs, "counts": counts, "commands": commands,
                "ansible_execs": ansible_execs, "after_ansible": again}

    # --- 2. downtime during a backend image change ---------------------------------

    def downtime(self, rate: float) -> dict:
        from rig.images import BACKEND_V2, TEST_IMAGES

        domain, port = self.settings.domain, self.settings.publish.https
        v2 = self.config("v2", images={"backend": BACKEND_V2})
        with ClientLoop(domain, port, rate=rate) as ours:
            time.sleep(2)
            start = time.perf_counter()
            self.deploy(v2)
            ours_took = time.perf_counter() - start
            time.sleep(2)
        assert ours.versions[-1] == "v2", ours.versions

        # The seed's deploy.sh: new compose file, pull, stop, start, wait for health.
        back = load_settings(invoke_section={**self.overrides, "images": dict(TEST_IMAGES)},
                             environ={}, files=[])
        upload_if_changed(Host(self.stack.conn), remote_files(back))
        seed = [compose(back, "pull", "--quiet"), compose(back, "stop"),
                compose(back, "up", "-d", "--wait", "--wait-timeout", "120")]
        with ClientLoop(domain, port, rate=rate) as theirs:
            time.sleep(2)
            start = time.perf_counter()
            for command in seed:
                self.stack.run(command, timeout=600)
            seed_took = time.perf_counter() - start
            time.sleep(2)
        status, _ = get(domain, port, "/health")
        assert status == 200
        return {"ours": ours, "ours_took": ours_took, "theirs": theirs, "seed_took": seed_took,
                "rate": rate}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--only", choices=("noop", "downtime"))
    parser.add_argument("--rate", type=float, default=50.0)
    args = parser.parse_args()
    if not shutil.which("ansible-playbook") and args.only != "downtime":
        print("ansible-playbook not found: pip install ansible-core", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="maicivy-bench-deploy-"))
    os.chmod(work, 0o755)
    bench = Bench(work)
    failed = False
    try:
        bench.setup()
        if args.only in (None, "noop"):
            r = bench.noop(args.runs)
            ours, theirs = statistics.median(r["ours"]), statistics.median(r["theirs"])
            ratio = theirs / ours
            n = r["counts"]["exec"]
            print(f"\nno-op redeploy, {args.runs} runs each, same SSH host, same files:")
            print(f"  maicivy-ops (fab deploy)   median {ours:6.2f} s  "
                  f"(min {min(r['ours']):.2f}, max {max(r['ours']):.2f})  "
                  f"remote commands: {n} (+{r['counts']['sftp']} sftp sessions)")
            for c in r["commands"]:
                print(f"      - {c}")
            print(f"  ansible-playbook (noop.yml) median {theirs:6.2f} s  "
                  f"(min {min(r['theirs']):.2f}, max {max(r['theirs']):.2f})  "
                  f"ssh executions: {r['ansible_execs']}")
            print(f"  ratio ansible/ours: {ratio:.1f}x (target >= 10x: "
                  f"{'met' if ratio >= 10 else 'NOT met'}); remote commands {n} "
                  f"(target <= 6: {'met' if n <= 6 else 'NOT met'})")
            failed |= ratio < 10 or n > 6
        if args.only in (None, "downtime"):
            r = bench.downtime(args.rate)
            o, t = r["ours"], r["theirs"]
            print(f"\ndowntime during a backend image change, client at ~{r['rate']:.0f} req/s "
                  "(4 threads, new TLS connection per request, GET /health and /):")
            print(f"  maicivy-ops deploy (v1 -> v2):         {len(o.failures):4d} failed of "
                  f"{o.total:5d} requests ({o.achieved_rate:.0f} req/s); deploy took "
                  f"{r['ours_took']:.1f} s")
            print(f"  seed deploy.sh stop/start (v2 -> v1): {len(t.failures):4d} failed of "
                  f"{t.total:5d} requests ({t.achieved_rate:.0f} req/s); sequence took "
                  f"{r['seed_took']:.1f} s; failures over {t.outage_seconds:.1f} s")
            print(f"  target 0 failed for ours: {'met' if not o.failures else 'NOT met'}")
            failed |= bool(o.failures)
    finally:
        bench.close()
        shutil.rmtree(work, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
