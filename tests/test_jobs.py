"""`prunetune submit` against a cluster whose job API refuses the job: one line, the cause and the fix."""
from prunetune.search import jobs
from prunetune.search.cli import main
from tests.runs import run_args


class _HeadWithoutAgent:
    """Ray's JobSubmissionClient as it answers when the head's dashboard agent could not bind its port."""

    def submit_job(self, **kwargs):
        raise RuntimeError("Request failed with status code 500: No available agent to submit job.")


def test_submit_to_a_head_whose_dashboard_agent_is_down_says_why_in_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(jobs, "client", lambda address: _HeadWithoutAgent())
    assert main(["submit", *run_args(tmp_path)[1:], "--address", "http://127.0.0.1:8265"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("prunetune: error: --address: the Ray cluster at "
                                                   "http://127.0.0.1:8265 has no dashboard agent")
    assert "--dashboard-agent-listen-port" in err and "Traceback" not in err
