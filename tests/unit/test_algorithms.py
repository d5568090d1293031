"""The algorithm objects behind `RLStage.algorithm` (`medjax.training.algorithms`): one
protocol, settings that would do nothing stopped with a line naming them, and the gin
bindings that reach each algorithm taking effect (hand-computed rewards)."""

import gin
import jax
import numpy as np
import pytest

from medjax import agents, losses, train_lib
from medjax.training import algorithms, optim, rl
from medjax.training.algorithms import base


def test_every_registered_algorithm_meets_the_protocol():
    assert set(algorithms.names()) == {"grpo", "grao", "mgrpo"}
    for name in algorithms.names():
        method = algorithms.of(name)
        assert isinstance(method, algorithms.RLAlgorithm), name
        assert method.name == name
        assert method.fields <= set(base.SPECIFIC_FIELDS)
    assert isinstance(algorithms.SFT(), algorithms.Algorithm)
    assert not isinstance(algorithms.SFT(), algorithms.RLAlgorithm)  # No RL settings.
    assert algorithms.names() == train_lib.ALGORITHMS


def test_a_new_algorithm_is_one_registered_class():
    @base.register
    class Mine:
        name = "mine"
        hierarchical = False
        fields = frozenset({"kl_beta"})

        def check(self, where, values, defaults):
            base.unused_fields(where, self.name, self.fields, values, defaults)

        def kl_beta(self, stage):
            return stage.kl_beta

        def loss_fn(self, stage, temperature):
            raise NotImplementedError

        def rows(self, stage, inputs):
            raise NotImplementedError

    try:
        stage = train_lib.RLStage(algorithm="mine", kl_beta=0.1)
        assert isinstance(stage.method, Mine) and stage.method.kl_beta(stage) == 0.1
        with pytest.raises(train_lib.TrainError, match="sub_target_count 3 does nothing"):
            train_lib.RLStage(algorithm="mine", sub_target_count=3)
    finally:
        del base.REGISTRY["mine"]
    with pytest.raises(train_lib.TrainError, match="algorithm 'mine' is not one of"):
        train_lib.RLStage(algorithm="mine")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"algorithm": "grao", "kl_beta": 0.04}, "RLStage 'rl': kl_beta 0.04 does nothing with"
         " algorithm 'grao'"),
        ({"algorithm": "mgrpo", "kl_beta": 0.04}, "kl_beta 0.04 does nothing with algorithm"
         " 'mgrpo'"),
        ({"algorithm": "mgrpo", "advantage_scale": "none"}, "advantage_scale 'none' does"
         " nothing with algorithm 'mgrpo'"),
        ({"algorithm": "grao", "reference": "/models/ref"}, "reference '/models/ref' does"
         " nothing with algorithm 'grao'"),
        ({"algorithm": "grpo", "advantage_scale": "none", "advantage_ddof": 0},
         "advantage_ddof 0 does nothing with advantage_scale 'none'"),
        ({"algorithm": "grpo", "sub_target_count": 4}, "sub_target_count 4 does nothing with"
         " algorithm 'grpo'"),
        ({"algorithm": "grao", "shared_model": False}, "shared_model False does nothing"),
        ({"algorithm": "mgrpo", "sub_optimizer": losses.grpo_loss}, "sub_optimizer does"
         " nothing with shared_model True"),
        ({"algorithm": "mgrpo", "sub_alignment": False, "sub_target_count": 4},
         "sub_target_count 4 does nothing with sub_alignment False"),
        ({"algorithm": algorithms.MGRPO(target_quantile=0.5)}, "MGRPO.target_quantile 0.5"
         " does nothing with a fixed sub_target_count"),
        ({"algorithm": algorithms.MGRPO(sub_reward_variant="paper")}, "MGRPO.sub_reward_variant"
         " 'paper' needs expert_rater"),
        ({"algorithm": algorithms.MGRPO(expert_rater=lambda s: 1.0)}, "MGRPO.expert_rater does"
         " nothing with sub_reward_variant 'released'"),
        ({"algorithm": algorithms.MGRPO(sub_reward_variant="both")}, "sub_reward_variant 'both'"
         " is not one of"),
        ({"algorithm": algorithms.MGRPO(sub_reward_weights=(0.1, 0.4, 0.5))},
         r"MGRPO.sub_reward_weights \(0.1, 0.4, 0.5\) is not 2 numbers"),
        ({"algorithm": 3}, "algorithm 3 is not one of"),
    ],
)  # fmt: skip
def test_a_setting_that_would_do_nothing_stops_the_stage_naming_it(kwargs, message):
    with pytest.raises(train_lib.TrainError, match=message) as e:
        train_lib.RLStage(**kwargs)
    assert "\n" not in str(e.value)


def test_the_settings_each_algorithm_reads_are_accepted():
    train_lib.RLStage(algorithm="grpo", kl_beta=0.04, reference="/models/ref",
                      advantage_scale="batch")  # fmt: skip
    train_lib.RLStage(algorithm="mgrpo", shared_model=False, sub_optimizer=optim.make_optimizer,
                      train_sub=False, sub_init_from="/models/sub")  # fmt: skip
    method = algorithms.MGRPO(target_quantile=0.5, sub_reward_variant="paper",
                              expert_rater=lambda s: 1.0)  # fmt: skip
    train_lib.RLStage(algorithm=method, sub_target_count=None)


@pytest.fixture
def clean_gin():
    gin.clear_config()
    yield
    gin.clear_config()


def test_a_grpo_beta_bound_on_the_loss_in_gin_is_the_kl_coefficient(clean_gin):
    """`losses.grpo_loss.beta` (what gin/algorithms/grpo.gin invites) scores the reference
    and reaches the loss; kl_beta disagreeing with it stops the stage."""
    gin.parse_config(
        "from __gin__ import dynamic_registration\n"
        "from medjax import losses\n"
        "losses.grpo_loss.beta = 0.04\n"
    )
    loss = gin.get_configurable(losses.grpo_loss)
    stage = train_lib.RLStage(algorithm="grpo", loss=loss)
    assert stage.method.kl_beta(stage) == 0.04
    assert (
        train_lib.RLStage(algorithm="grpo", loss=loss, kl_beta=0.04).method.kl_beta(stage) == 0.04
    )
    assert train_lib.RLStage(algorithm="grpo").method.kl_beta(train_lib.RLStage()) == 0.0
    with pytest.raises(train_lib.TrainError, match=r"kl_beta 0\.1 and the loss.s bound beta 0\.04"):
        train_lib.RLStage(algorithm="grpo", loss=loss, kl_beta=0.1)
    train_lib.RLStage(algorithm="grpo", loss=loss, reference="/models/ref")
    # The loss the stage trains with carries the bound beta: one token, ratio 1, advantage
    # 0, log pi - log ref = -0.5 -> k3 KL = exp(0.5) - 0.5 - 1; loss = beta * KL.
    logps = np.array([[-1.0]], np.float32)
    value, _ = loss(logps, None, np.zeros(1, np.float32), np.ones((1, 1), np.float32),
                    ref_per_token_logps=np.array([[-0.5]], np.float32))  # fmt: skip
    np.testing.assert_allclose(float(value), 0.04 * (np.exp(0.5) - 0.5 - 1), rtol=1e-6)


def test_mgrpo_options_bound_in_gin_reach_the_stage(clean_gin):
    gin.parse_config(
        "from __gin__ import dynamic_registration\n"
        "from medjax import train_lib\n"
        "from medjax.training import algorithms\n"
        "train_lib.RLStage.algorithm = @algorithms.MGRPO()\n"
        "train_lib.RLStage.sub_target_count = None\n"
        "algorithms.MGRPO.main_reward_weights = (0.2, 0.8)\n"
        "algorithms.MGRPO.target_quantile = 0.5\n"
    )
    stage = gin.get_configurable(train_lib.RLStage)()
    assert stage.method == algorithms.MGRPO(main_reward_weights=(0.2, 0.8), target_quantile=0.5)


def _sub(i: int, answered: bool) -> agents.Trajectory:
    return agents.Trajectory(
        f"s{i}", 0, "searcher", token_ids=[10 + i, 20 + i], loss_mask=[0, 1],
        logps=[0.0, -1.0], answer="x" if answered else None,
        finish_reason="answer" if answered else "no_answer",
    )  # fmt: skip


def _rows_of(method: algorithms.MGRPO, subs, owner, correct, target_count):
    stage = train_lib.RLStage(algorithm=method, sub_target_count=target_count)
    return method.sub_rows(
        stage, subs, np.asarray(owner), np.asarray(correct, np.float32), 2, 0,
        jax.random.key(0), pad_id=3, shaping=None,
    )  # fmt: skip


def test_mgrpo_paper_sub_reward_adds_the_expert_rating():
    """R_S = 0.1 format + 0.4 main correct + 0.5 r_expert (Eq. 5) with a rater; the
    released variant has no r_expert: 0.1 format + 0.9 main correct."""
    subs = [_sub(0, True), _sub(1, True), _sub(2, False)]  # One per rollout, one unused.
    owner, correct = [0, 1, 1], [1.0, 0.0]  # One query, K = 2; rollout 1 called twice.
    ratings = {"s0": 0.8, "s1": 0.6, "s2": 1.0}
    paper = algorithms.MGRPO(sub_reward_variant="paper", expert_rater=lambda s: ratings[s.query_id])
    # d = 1 keeps one sub-trajectory per rollout; s2 has no answer, so its R_S is 0 (Eq. 5)
    # whichever of s1 and s2 the alignment keeps for rollout 1 -- a kept s2 would show in
    # the mean below as 0, so check which one was kept.
    rows, stats = _rows_of(paper, subs, owner, correct, 1)
    kept = rows["input_ids"][:, 0].tolist()
    assert kept[0] == 10
    # s0: 0.1 * 1 + 0.4 * 1 + 0.5 * 0.8 = 0.9; s1: 0.1 + 0.4 * 0 + 0.5 * 0.6 = 0.4; s2: 0.
    paper_r1 = {11: 0.4, 12: 0.0}[kept[1]]
    np.testing.assert_allclose(stats["sub/reward_mean"], (0.9 + paper_r1) / 2, rtol=1e-6)
    _, stats = _rows_of(algorithms.MGRPO(), subs, owner, correct, 1)
    released_r1 = {11: 0.1, 12: 0.0}[kept[1]]  # Same key, same alignment draw.
    np.testing.assert_allclose(stats["sub/reward_mean"], (1.0 + released_r1) / 2, rtol=1e-6)
    weighted = algorithms.MGRPO(sub_reward_weights=(0.5, 0.5))
    _, stats = _rows_of(weighted, subs, owner, correct, 1)
    weighted_r1 = {11: 0.5, 12: 0.0}[kept[1]]
    np.testing.assert_allclose(stats["sub/reward_mean"], (1.0 + weighted_r1) / 2, rtol=1e-6)


def test_mgrpo_target_quantile_chooses_d_per_step():
    """Counts [3, 1] over the two rollouts: the 0.5 quantile is 1, the 0.99 quantile 3."""
    subs = [_sub(0, True), _sub(1, True), _sub(2, True), _sub(3, True)]
    owner, correct = [0, 0, 0, 1], [1.0, 0.0]
    _, stats = _rows_of(algorithms.MGRPO(target_quantile=0.5), subs, owner, correct, None)
    assert stats["sub/target_count"] == 1
    _, stats = _rows_of(algorithms.MGRPO(), subs, owner, correct, None)
    assert stats["sub/target_count"] == 3
    _, stats = _rows_of(algorithms.MGRPO(), subs, owner, correct, 2)
    assert stats["sub/target_count"] == 2


def test_mgrpo_main_reward_weights_reach_the_main_rows():
    """R_M = a1 format + a2 correct: with (0.5, 0.5) a correct, well-formed rollout gets 1
    and one with neither 0 (rl.mgrpo_main_batch, as MGRPO.rows calls it)."""
    from medjax.envs import research

    def main(i, answer):
        return agents.Trajectory(
            "q", i, "main", token_ids=[5, 6], loss_mask=[0, 1], logps=[0.0, -1.0],
            answer=answer, finish_reason="answer" if answer else "no_answer",
        )  # fmt: skip

    records = [{"question": "q?", "answer": {"name": "yes", "aliases": ["yes"]}}]
    trajs = [main(0, "yes"), main(1, None)]
    _, _, rewards, _ = rl.mgrpo_main_batch(
        trajs, records, 2, reward=research.RewardConfig(), pad_id=3, main_weights=(0.5, 0.5)
    )
    np.testing.assert_allclose(rewards, [1.0, 0.0])
    _, _, rewards, _ = rl.mgrpo_main_batch(
        trajs, records, 2, reward=research.RewardConfig(), pad_id=3,
        main_weights=algorithms.MGRPO().main_reward_weights,
    )  # fmt: skip
    np.testing.assert_allclose(rewards, [0.1 + 0.9, 0.0])
