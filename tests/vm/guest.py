"""Commands in a guest over ssh, shared by the QEMU cluster and the Vagrant one.

A subclass says how to reach a machine (``ssh_argv(m, command)``: an argv that runs
`command` with sh as root in the guest); this gives the rest of the interface the scenarios
use to run commands. Stateless.
"""
import shlex
import subprocess


class GuestShell:
    def ssh_argv(self, m, command):
        raise NotImplementedError

    def ssh(self, m, command, timeout=600, check=True, input=None):
        """Run `command` in the guest; RuntimeError with its stderr if it fails and `check`."""
        result = subprocess.run(self.ssh_argv(m, command), capture_output=True, text=True,
                                timeout=timeout, input=input)
        if check and result.returncode != 0:
            raise RuntimeError(f"{m.name}: `{command}` exited {result.returncode}: "
                               f"{result.stderr.strip()[-2000:]}")
        return result

    def spawn(self, m, command, log_name):
        """Run `command` in the guest in the background, all three streams redirected."""
        self.ssh(m, f"setsid sh -c {shlex.quote(command)} >/var/log/{log_name}.log 2>&1 "
                    "</dev/null &", timeout=60)
