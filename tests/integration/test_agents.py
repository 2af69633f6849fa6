"""
The real coding agents against the proxy and the simulator: Claude Code (C{claude -p}) on the
Messages API and Codex CLI (C{codex exec}) on the Responses API, from the pinned npm packages
that C{tests/tools/install} puts in C{tests/tools/node_modules}.  Each answers a prompt and
completes one tool loop: the simulator's directive asks for a shell command that prints a
marker, the agent runs it, and the marker comes back in the agent's final answer.

Each agent runs with its C{HOME} (and C{CODEX_HOME}) in the test's temp folder, talks to the
proxy on loopback only, and is bounded by C{timeout}.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import SkipTest, TestCase

from tests.support.proxy import RunningProxy

BIN = Path(__file__).parent.parent / "tools" / "node_modules" / ".bin"
# Agents send max_tokens of 32000 and prompts of 30000 words: the simulated model stops early
# and has the room.
PROFILES: dict[str, dict[str, Any]] = {
    "qwen": {"model": {"model_name": "Qwen3-8B", "max_seq_len": 200_000}, "simulator": {"stop_after_tokens": 12}},
}
AGENT_SECONDS = 90


def agent(name: str) -> str:
    """
    The agent's command, or a skip that says what is missing.
    """
    if shutil.which("node") is None:
        raise SkipTest("node is not installed: the coding agents need it (tests/tools/install)")
    command = BIN / name
    if not command.exists():
        raise SkipTest(f"{command} is missing: run tests/tools/install")
    return str(command)


class AgentTestCase(TestCase):
    timeout = 2 * AGENT_SECONDS + 30

    def setUp(self) -> None:
        self.home = Path(self.mktemp()).absolute()
        self.work = self.home / "work"
        self.work.mkdir(parents=True)
        self.proxy = RunningProxy(self, PROFILES)

    async def runAgent(self, command: str, *arguments: str, **env: str) -> str:
        environment = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(self.home),
                       "NO_PROXY": "127.0.0.1", **env}
        out, err, code = await getProcessOutputAndValue(
            # Standard input is empty, as codex reads it to the end before it starts.
            "timeout", [str(AGENT_SECONDS), "sh", "-c", 'exec "$@" < /dev/null', "agent", command, *arguments],
            env=environment, path=str(self.work),
            reactor=reactor)
        self.assertEqual(code, 0, (out[-2000:], err[-2000:]))
        return out.decode("utf-8", "replace")


class ClaudeCodeTests(AgentTestCase):
    def claude(self, prompt: str, *arguments: str) -> Any:
        return self.runAgent(agent("claude"), "-p", prompt, "--model", "qwen", *arguments,
                             ANTHROPIC_BASE_URL=self.proxy.url, ANTHROPIC_AUTH_TOKEN="unused",
                             CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC="1", DISABLE_AUTOUPDATER="1")

    async def test_answersAndRunsATool(self) -> None:
        """
        C{claude -p} answers a prompt with the model's text, and runs the Bash command the
        model asks for, whose output comes back in its final answer.
        """
        answer = await self.claude("say hi")
        self.assertTrue(answer.startswith("Qwen3-8B "), answer)
        answer = await self.claude('Run it [[call Bash {"command": "echo MARK-CLAUDE-$((6 * 7))"}]]',
                                   "--allowedTools", "Bash")
        self.assertIn("MARK-CLAUDE-42", answer)


class CodexTests(AgentTestCase):
    def codex(self, prompt: str, *arguments: str) -> Any:
        codexHome = self.home / "codex"
        codexHome.mkdir(exist_ok=True)
        (codexHome / "config.toml").write_text(
            'model = "qwen"\nmodel_provider = "tabby"\n\n[model_providers.tabby]\nname = "tabbyproxy"\n'
            f'base_url = "{self.proxy.url}/v1"\nwire_api = "responses"\n'
        )
        return self.runAgent(agent("codex"), "exec", "--skip-git-repo-check", *arguments, prompt,
                             CODEX_HOME=str(codexHome))

    async def test_answersAndRunsATool(self) -> None:
        """
        C{codex exec} answers a prompt with the model's text, and runs the command the model
        asks for, whose output comes back in its final answer.
        """
        answer = await self.codex("say hi")
        self.assertTrue(answer.startswith("Qwen3-8B "), answer)
        answer = await self.codex('Run it [[call exec_command {"cmd": "echo MARK-CODEX-$((6 * 7))"}]]',
                                  "--dangerously-bypass-approvals-and-sandbox")
        self.assertIn("MARK-CODEX-42", answer)
