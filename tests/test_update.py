"""The update rule, step by step, against the official one built from torch: torch.optim.AdamW
(the arithmetic of apex's FusedAdam, which the official code trains with), clip_grad_norm_,
the official warm-up (LambdaLR over its linear_warmup, stepped on every step, skipped ones
too), the skip test and the EMA formula, all fed the same injected gradients: some far below
Adam's epsilon, a clipped one, a spike that is skipped and a NaN."""
import keras
import numpy as np
import pytest
import tensorflow as tf

import hparams
import steps
import update

torch = pytest.importorskip('torch')

HP = dict(lr=1e-3, warmup_iters=5, ema_rate=0.9, adam_beta1=0.9, adam_beta2=0.9, adam_eps=1e-8,
          weight_decay=0.01, grad_clip=200., skip_threshold=1000.)
STEPS = 20
SPIKE, NAN, CLIPPED = 7, 12, 4         # steps (0-based) with a skipped spike, a NaN, a clipped norm


def _gradients(shapes):
    """Per step and variable a gradient of its own scale, 1e-10 to 1e-1: small-gradient
    weights are where Adam's epsilon matters."""
    rng = np.random.default_rng(0)
    scales = 10. ** rng.uniform(-10, -1, len(shapes))
    steps = []
    for k in range(STEPS):
        grads = [(s * rng.standard_normal(shape)).astype(np.float32) for s, shape in zip(scales, shapes)]
        if k == SPIKE:
            grads = [g * 1e6 for g in grads]
        if k == CLIPPED:                    # a global norm of 500: clipped to 200, applied
            norm = np.sqrt(sum(float(np.sum(g.astype(np.float64) ** 2)) for g in grads))
            grads = [(g * (500. / norm)).astype(np.float32) for g in grads]
        if k == NAN:
            grads[0].flat[0] = np.nan
        steps.append(grads)
    return steps


def _official(initial, gradients, hp):
    """The official update (train_helpers.py, train.py of openai/vdvae) in torch."""
    params = [torch.tensor(w, requires_grad=True) for w in initial]
    ema = [w.copy() for w in initial]
    optimizer = torch.optim.AdamW(params, lr=hp.lr, betas=(hp.adam_beta1, hp.adam_beta2), eps=hp.adam_eps,
                                  weight_decay=hp.weight_decay)
    warmup = lambda it: 1.0 if it > hp.warmup_iters else it / hp.warmup_iters     # linear_warmup
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda=warmup)
    history = []
    for grads in gradients:
        for p, g in zip(params, grads):
            p.grad = torch.tensor(g)
        norm = torch.nn.utils.clip_grad_norm_(params, hp.grad_clip).item()
        skipped = not (np.isfinite(norm) and norm < hp.skip_threshold)
        if not skipped:
            optimizer.step()
            for e, p in zip(ema, params):
                e *= hp.ema_rate
                e += p.detach().numpy() * (1 - hp.ema_rate)
        scheduler.step()
        moments = [(optimizer.state[p]['exp_avg'].numpy().copy(), optimizer.state[p]['exp_avg_sq'].numpy().copy())
                   if p in optimizer.state else None for p in params]
        history.append(dict(norm=norm, skipped=skipped, weights=[p.detach().numpy().copy() for p in params],
                            ema=[e.copy() for e in ema], moments=moments))
    return history


def _ours(hp, gradients):
    strategy = tf.distribute.get_strategy()
    keras.utils.set_random_seed(0)
    state = steps.create_state(hp, strategy)
    variables = state.model.trainable_variables
    assert len(variables) == len(state.model.weights)          # the EMA covers these
    rule = update.update_rule(state, hp, strategy)
    step = tf.function(lambda grads: strategy.run(rule, args=(grads, tf.constant(True))), autograph=False)
    initial = [v.numpy() for v in variables]
    history = []
    for grads in gradients:
        norm, skip = step([tf.constant(g) for g in grads])
        opt = state.optimizer
        moments = [(opt._momentums[opt._get_variable_index(v)].numpy(), opt._velocities[opt._get_variable_index(v)].numpy())
                   for v in variables]
        history.append(dict(norm=float(norm), skipped=bool(skip), weights=[v.numpy() for v in variables],
                            ema=[e.numpy() for e in state.ema], moments=moments))
    return initial, history, state


@pytest.fixture(scope='module')
def runs():
    hp = hparams.load('tiny', **HP)
    keras.utils.set_random_seed(0)
    shapes = [tuple(v.shape) for v in steps.create_state(hp, tf.distribute.get_strategy()).model.trainable_variables]
    gradients = _gradients(shapes)
    initial, ours, state = _ours(hp, gradients)
    return hp, gradients, initial, ours, _official(initial, gradients, hp), state


def _largest_difference(a, b):
    return max(float(np.max(np.abs(x - y))) for x, y in zip(a, b))


def test_every_step_matches_the_official_update(runs):
    hp, _, _, ours, official, state = runs
    assert [h['skipped'] for h in ours] == [h['skipped'] for h in official]
    assert [k for k, h in enumerate(ours) if h['skipped']] == [SPIKE, NAN]
    assert hp.grad_clip < official[CLIPPED]['norm'] < hp.skip_threshold     # clipped, applied
    for k, (a, b) in enumerate(zip(ours, official)):
        if np.isfinite(b['norm']):
            assert a['norm'] == pytest.approx(b['norm'], rel=1e-5), k
        else:
            assert not np.isfinite(a['norm']), k
        # Weights and EMA to a thousandth of one step's size; Adam's moments to float rounding.
        assert _largest_difference(a['weights'], b['weights']) < 1e-3 * hp.lr, k
        assert _largest_difference(a['ema'], b['ema']) < 1e-3 * hp.lr, k
        for mine, theirs in zip(a['moments'], b['moments']):
            for x, y in zip(mine, theirs or ()):        # relative to the variable's own scale
                np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-5 * np.abs(y).max(), err_msg=str(k))
    # Skipped steps count for the warm-up but not for Adam.
    assert int(state.step.numpy()) == STEPS and int(state.optimizer.iterations.numpy()) == STEPS - 2
    # The run moved: the comparison is not of two frozen models.
    assert _largest_difference(ours[-1]['weights'], ours[0]['weights']) > 10 * hp.lr


def test_keras_own_epsilon_placement_would_not_match(runs, monkeypatch):
    """Why update.AdamW exists: Keras' AdamW adds epsilon to the uncorrected sqrt(v), and the
    weights with tiny gradients drift from the official ones by a good part of a step."""
    hp, gradients, _, _, official, _ = runs
    monkeypatch.setattr(update, 'AdamW', keras.optimizers.AdamW)
    _, keras_run, _ = _ours(hp, gradients)
    drift = max(_largest_difference(a['weights'], b['weights']) for a, b in zip(keras_run, official))
    assert drift > 0.1 * hp.lr, drift
