"""medjax.training.decoupled and medjax.store.status: the sub-agent endpoint (one batch for
concurrent requests, its log, bad requests), the main side's client (fail fast or wait), a
failed delegate as a counted tool error, staleness, idempotent publishing, and the status
summary, each checked by hand. The two real processes are in tests/integration."""

import json
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

from medjax import agents, llm
from medjax.envs import research
from medjax.models import tokenizer as tokenizer_lib
from medjax.store import FileStore, MemoryStore, open_store
from medjax.store import status as status_lib
from medjax.training import decoupled

CORPUS = ["<answer>found it</answer> find the gene", "<think>no</think> search more"] * 20


@pytest.fixture(scope="module")
def tok():
    return tokenizer_lib.train_bpe(CORPUS, vocab_size=300)


def searcher(tok, calls):
    """A sub-agent whose scripted policy answers `<answer>got: TASK</answer>`."""

    def reply(prompt):
        calls.append(prompt)
        task = prompt.rsplit("<|im_start|>user\n", 1)[1].split("<|im_end|>")[0]
        return f"<answer>got: {task}</answer>"

    return lambda model, seed: agents.AgentSpec(
        "searcher", llm.ScriptedBackend(reply, tok), max_turns=2
    )


def post(url, body):
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def invocation(query, rollout, index, task):
    return {"query_id": query, "rollout_index": rollout, "invocation_index": index, "task": task}


@pytest.fixture
def server(tok, tmp_path):
    prompts = []
    log = FileStore(tmp_path / "log")
    s = decoupled.SubAgentServer(searcher(tok, prompts), log, batch_window=0.5).start()
    s.set_policy(object(), version=3)
    s.prompts, s.log = prompts, log
    yield s
    s.close()


def test_concurrent_requests_share_one_batch_and_are_logged(server):
    assert server.url.startswith("http://127.0.0.1:")
    results = {}

    def send(name, calls):
        body = {"step": 5, "epoch": 1, "seed": 11, "invocations": calls}
        results[name] = post(server.url + "/delegate", body)

    threads = [
        threading.Thread(target=send, args=("a", [invocation("q1", 0, 0, "alpha")])),
        threading.Thread(
            target=send,
            args=("b", [invocation("q1", 1, 0, "beta"), invocation("q2", 0, 1, "gamma")]),
        ),
    ]
    for t in threads:
        t.start()
        time.sleep(0.05)
    for t in threads:
        t.join()
    assert server.batches == 1  # One run of the sub-agent loop for all three calls.
    code, a = results["a"]
    assert code == 200
    assert a["results"] == [{
        "sub_id": "00000005/1/q1/0/0", "version": 3, "summary": "got: alpha",
        "finish_reason": "answer", "format_errors": 0,
    }]  # fmt: skip
    code, b = results["b"]
    assert [r["summary"] for r in b["results"]] == ["got: beta", "got: gamma"]
    assert [r["sub_id"] for r in b["results"]] == ["00000005/1/q1/1/0", "00000005/1/q2/0/1"]
    logged = server.log.get("00000005/1/q2/0/1")
    assert logged["version"] == 3
    traj = agents.Trajectory.from_dict(logged["trajectory"])
    assert (traj.rollout_index, traj.invocation_index, traj.answer) == (0, 1, "got: gamma")
    assert len(server.prompts) == 3


def test_bad_requests_get_a_clear_400(server):
    code, body = post(server.url + "/delegate", {"step": "x", "epoch": 1, "seed": 1})
    assert code == 400 and "'step' must be an integer" in body["error"]
    code, body = post(
        server.url + "/delegate",
        {"step": 1, "epoch": 1, "seed": 1, "invocations": [{"query_id": "q", "task": "t"}]},
    )
    assert code == 400 and "invocations[0]" in body["error"]
    code, body = post(server.url + "/nowhere", {})
    assert code == 404
    with urllib.request.urlopen(server.url + "/health", timeout=10) as response:
        assert json.loads(response.read()) == {"version": 3, "ready": True}
    assert server.batches == 0


def test_client_fails_fast_when_the_sub_agent_is_down():
    dead = "http://127.0.0.1:9"  # Nothing listens on the discard port.
    client = decoupled.RemoteSubAgent(lambda: dead, epoch=1, on_failure="error")
    calls = [agents.Delegation("q", 0, 0, "t"), agents.Delegation("q", 1, 0, "t")]
    start = time.monotonic()
    results = client(calls)
    assert time.monotonic() - start < 2.0
    assert all(r.error.startswith("sub-agent unavailable") for r in results)
    assert client.failures == 2
    waiting = decoupled.RemoteSubAgent(lambda: dead, epoch=1, on_failure="wait", timeout=0.6)
    start = time.monotonic()
    assert waiting(calls[:1])[0].error is not None
    assert 0.6 <= time.monotonic() - start < 3.0  # Retried until its timeout.


def test_a_failed_delegate_is_a_counted_tool_error_not_a_format_error(tok):
    def client(calls):
        return [agents.DelegateResult(error="sub-agent unavailable (down)")] * len(calls)

    replies = iter([
        '<tool_call>{"name": "delegate", "arguments": {"task": "find"}}</tool_call>',
        "<answer>x</answer>",
    ])  # fmt: skip
    main = agents.AgentSpec(
        "main", llm.ScriptedBackend(lambda prompt: next(replies), tok),
        tools=[agents.remote_delegate_tool(client)], max_turns=3,
    )  # fmt: skip
    (traj,) = agents.run_episodes(main, [agents.Query("q", "question")])
    assert (traj.tool_failures, traj.format_errors, traj.finish_reason) == (1, 0, "answer")
    assert traj.turns[0].observation == (
        "<tool_response>\nError: sub-agent unavailable (down)\n</tool_response>"
    )
    assert traj.sub_trajectories == []


def test_stale_and_missing_sub_trajectories_are_left_out_and_counted():
    log = MemoryStore()
    for ident, version in (("a", 5), ("b", 3), ("c", 2)):
        traj = agents.Trajectory("q", 0, "searcher", invocation_index=0, finish_reason="answer")
        log.put(ident, {"version": version, "trajectory": traj.to_dict()})
    record = {
        "step": 4, "epoch": 1, "rollouts": [
            {"key": "k0", "correct": 1.0, "sub_ids": ["a", "b"]},
            {"key": "k1", "correct": 0.0, "sub_ids": ["c", "gone"]},
        ],
    }  # fmt: skip
    got = decoupled.gather_step(record, log, version=5, staleness_window=2)
    # Ages 0 and 2 are within the window; age 3 is stale; "gone" was never logged.
    assert (got.dropped_stale, got.missing) == (1, 1)
    assert got.owner.tolist() == [0, 0]
    np.testing.assert_array_equal(got.correct, [1.0, 0.0])
    assert [r["applied_sub_ids"] for r in got.applied["rollouts"]] == [["a", "b"], []]


def test_publishing_a_step_twice_keeps_the_first_record():
    s = MemoryStore()
    assert decoupled.next_epoch(s) == 1 and decoupled.next_epoch(s) == 2
    sub = agents.Trajectory("q", 1, "searcher", metadata={"sub_id": "x/1", "version": 4})
    trajs = [
        agents.Trajectory("q", 0, "main", tool_failures=2),
        agents.Trajectory("q", 1, "main", sub_trajectories=[sub]),
    ]
    terms = [research.RewardTerms(1.0, 1.0, 1, 0, 1.1, 1.0, 0),
             research.RewardTerms(0.0, 0.0, 1, 0, 0.0, 0.0, 2)]  # fmt: skip
    assert decoupled.publish_step(s, 7, 2, 7, trajs, terms, np.array([1.0, 0.0]), 2)
    first = s.get(decoupled.step_key(7))
    assert first["rollouts"][1] == {
        "key": "00000007/q/1", "query_id": "q", "rollout_index": 1, "format_valid": 0.0,
        "correct": 0.0, "main_reward": 0.0, "sub_ids": ["x/1"], "sub_versions": [4],
        "delegate_failures": 0,
    }  # fmt: skip
    assert first["rollouts"][0]["delegate_failures"] == 2
    assert not decoupled.publish_step(s, 7, 3, 7, trajs[:1], terms[:1], np.array([0.5]), 1)
    assert s.get(decoupled.step_key(7)) == first


def test_status_summary_by_hand(capsys, tmp_path):
    s = FileStore(tmp_path / "store")
    s.put("main/epoch", {"epoch": 2})
    for step, n in ((0, 4), (1, 4), (2, 3)):
        record = {"step": step, "epoch": 2, "main_version": step, "time": 100.0 + step,
                  "rollouts": [{"sub_versions": [step, 1]} for _ in range(n)]}  # fmt: skip
        s.put(decoupled.step_key(step), record)
    s.put("main/progress", {"published_steps": 3, "time": 110.0, "delegate_failures": 5})
    s.put("sub/progress", {"applied_steps": 1, "version": 1, "url": "http://127.0.0.1:1",
                           "time": 108.0, "status": "training", "dropped_stale": 2})  # fmt: skip
    got = status_lib.summary(s, now=120.0)
    assert got["queue"] == {"steps": 2, "rollouts": 7, "lag_steps": 2, "oldest_waiting_s": 19.0}
    assert got["main"]["epoch"] == 2 and got["main"]["delegate_failures"] == 5
    assert got["main"]["last_update_s_ago"] == 10.0
    assert got["last_record"] == {"main_version": 2, "epoch": 2, "sub_versions": [1, 2]}
    assert got["sub"]["dropped_stale"] == 2 and got["sub"]["missing"] == 0
    assert status_lib.main(["--store", f"file://{tmp_path / 'store'}"]) == 0
    out = capsys.readouterr().out
    assert "2 steps / 7 rollout statistics waiting; lag 2 steps" in out
    assert "2 sub-trajectories dropped as stale" in out
    assert status_lib.main(["--store", f"file://{tmp_path / 'absent'}"]) == 1
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "absent").exists()


def test_a_store_serves_one_run_and_bad_urls_say_why(tmp_path):
    s = MemoryStore()
    decoupled.claim(s, "main", "/runs/a (created 1.000)")
    decoupled.claim(s, "main", "/runs/a (created 1.000)")  # The same run resuming.
    decoupled.claim(s, "sub", "/runs/b (created 2.000)")
    with pytest.raises(decoupled.StoreInUseError, match=r"another main run \(/runs/a"):
        decoupled.claim(s, "main", "/runs/a (created 3.000)")  # Same path, made anew.
    with pytest.raises(ValueError, match="atomic if_absent"):
        open_store("gs://bucket/run")
    with pytest.raises(ValueError, match="unknown store"):
        open_store("s3://bucket/run")


def test_bad_configurations_name_the_field():
    with pytest.raises(ValueError, match=r"Decoupled.role 'both'"):
        decoupled.Decoupled(role="both")
    with pytest.raises(ValueError, match=r"on_sub_failure 'retry'"):
        decoupled.Decoupled(on_sub_failure="retry")
    from medjax import train_lib

    with pytest.raises(train_lib.TrainError, match="decoupled trainers are for algorithm 'mgrpo'"):
        train_lib.RLStage(algorithm="grpo", decoupled=decoupled.Decoupled())
    with pytest.raises(train_lib.TrainError, match="role 'doctor'"):
        train_lib.SFTStage(role="doctor")
    with pytest.raises(train_lib.TrainError, match="role 'nurse'"):
        train_lib.SFTStage(role=(None, "nurse"))
    with pytest.raises(train_lib.TrainError, match="train_sub and sub_init_from are for M-GRPO"):
        train_lib.RLStage(algorithm="mgrpo", train_sub=False)  # One shared model.
    with pytest.raises(train_lib.TrainError, match="train_sub and sub_init_from are for M-GRPO"):
        train_lib.RLStage(algorithm="grpo", sub_init_from="/models/sub")
    with pytest.raises(train_lib.TrainError, match=r"hops \(5, 3\) is not \(min, max\)"):
        train_lib.RLStage(hops=(5, 3))


def test_stage_hops_select_records_and_an_empty_range_names_the_stage():
    from types import SimpleNamespace

    from medjax import train_lib
    from medjax.training import runtime

    run = SimpleNamespace(data=SimpleNamespace(records=[{"hops": 2}, {"hops": 5}, {}, {"hops": 3}]))
    assert runtime.stage_records(run, train_lib.RLStage()) == [0, 1, 2, 3]
    assert runtime.stage_records(run, train_lib.RLStage(hops=(2, 3))) == [0, 3]
    assert runtime.stage_records(run, train_lib.RLStage(hops=(4, 6))) == [1]
    with pytest.raises(train_lib.TrainError, match=r"RLStage 'hard': no training question has 7-9"):
        runtime.stage_records(run, train_lib.RLStage(name="hard", hops=(7, 9)))
