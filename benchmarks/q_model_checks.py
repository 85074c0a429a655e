"""What README's Q-learning section says of the Q search mode's learned model, measured.

    python benchmarks/q_model_checks.py action-signal
    python benchmarks/q_model_checks.py dynamics-weights runs/<run>/checkpoint.pt
    python benchmarks/q_model_checks.py corridor --seeds 1 2 3 4 [--steps 4800]

action-signal: at initialisation, how far two actions move q_learning.py's next latent from one
latent, against how far one action moves it from two latents (the mean distance of each, their
ratio), for 2, 9 and 18 actions on a 1x1 latent (the test corridor's) and a 7x7 one (Atari's),
seeds 0-4: with the dynamics' action bias, and with it zeroed (the one-hot planes alone).

dynamics-weights CHECKPOINT: the root mean square of the dynamics' first convolution's weights
in a q_learning.py checkpoint (any version), its latent taps and its action taps apart, against
the standard deviation PyTorch initialises them with (uniform on +-1/sqrt(fan-in)).

corridor: for each seed, the search mode's corridor run of the test suite
(test_smoke.q_corridor_args(..., "search"), its defaults but sizes) with --total-env-steps and
--buffer-size set to --steps, then its final weights scored with 0, 2, 10 and 25 simulations
(25 is the run's own evaluation), and the model's one-step reward for both actions from every
cell of both layouts (the step onto the goal pays 1). One run takes 2-5 minutes on one CPU core.
"""
import argparse
import os
import pathlib
import sys
import tempfile

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import q_learning as Q  # noqa: E402


def action_signal():
    torch.set_num_threads(1)
    for latent_hw in [(1, 1), (7, 7)]:
        for actions in (2, 9, 18):
            for bias in (True, False):
                ratios = []
                for seed in range(5):
                    torch.manual_seed(seed)
                    dynamics = Q.without_batch_norm(Q.Dynamics(64, actions, 1, 16, 512, 10, latent_hw))
                    if not bias:
                        with torch.no_grad():
                            dynamics.action_bias.weight.zero_(), dynamics.action_bias.bias.zero_()
                    latent = Q.scale_hidden(torch.relu(torch.randn(64, 64, *latent_hw)))
                    with torch.no_grad():
                        first, second = (dynamics(latent, torch.full((64,), a))[0] for a in (0, 1))
                    by_action = (first - second).flatten(1).norm(dim=1).mean()
                    by_latent = (first - first.roll(1, 0)).flatten(1).norm(dim=1).mean()
                    ratios.append(float(by_action / by_latent))
                print(f"latent {latent_hw[0]}x{latent_hw[1]} | {actions:2d} actions | "
                      f"{'with the bias ' if bias else 'planes alone  '} | ratio "
                      f"{min(ratios):.2f}-{max(ratios):.2f}", flush=True)


def dynamics_weights(path):
    state = torch.load(path, map_location="cpu", weights_only=False)["net"]
    state = {key.removeprefix("module."): value for key, value in state.items()}
    weight = state["dynamics.conv.weight"]                                  # [C, C + A, 3, 3]
    channels = weight.shape[0]
    initial = 1 / (3 * weight[0].numel()) ** 0.5  # std of uniform(+-1/sqrt(fan_in))
    rms = lambda w: float(w.pow(2).mean().sqrt())
    print(f"{path}: dynamics.conv.weight {tuple(weight.shape)} | latent taps rms {rms(weight[:, :channels]):.4f} | "
          f"action taps rms {rms(weight[:, channels:]):.4f} | at initialisation {initial:.4f}")


def corridor(seeds, steps):
    import test_smoke as t
    torch.set_num_threads(1)
    for seed in seeds:
        with tempfile.TemporaryDirectory() as run_dir:
            args = t.q_corridor_args(pathlib.Path(run_dir), seed, "search")
            args.total_env_steps = args.buffer_size = steps
            result = Q.train(args, t.big_env_fn)
            net = result["net"].eval()
            scores = {}
            for sims in (0, 2, 10, 25):
                args.eval_simulations = sims
                scores[sims] = float(Q.evaluate(net, t.big_env_fn, args, torch.device("cpu"), args.seed + 10**6).mean())
            print(f"seed {seed} | {steps:,} steps | evaluation with 0/2/10/25 simulations: "
                  + " / ".join(f"{scores[s]:.2f}" for s in (0, 2, 10, 25)), flush=True)
            recurrent_fn = Q.make_recurrent_fn(net, args)
            for goal_right in (True, False):
                env = t.BigCorridor()
                env.reset(seed=1 if goal_right else 0)
                frames = []
                for cell in range(1, t.LENGTH - 1):
                    env.position = cell
                    frames.append(env._obs())
                with torch.no_grad():
                    latent, _ = net.initial_inference(torch.as_tensor(np.stack(frames)))
                    rewards = [recurrent_fn(latent, torch.full((len(frames),), a))[0] for a in (0, 1)]
                layout = "goal right" if goal_right else "goal left "
                for a, name in ((0, "left "), (1, "right")):
                    print(f"  {layout} | {name} from cells 1-{t.LENGTH - 2}: reward "
                          + " ".join(f"{r:.2f}" for r in rewards[a].tolist()), flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("action-signal")
    sub.add_parser("dynamics-weights").add_argument("checkpoint")
    run = sub.add_parser("corridor")
    run.add_argument("--seeds", type=int, nargs="+", default=[1])
    run.add_argument("--steps", type=int, default=4800)
    args = parser.parse_args()
    if args.command == "action-signal":
        action_signal()
    elif args.command == "dynamics-weights":
        dynamics_weights(args.checkpoint)
    else:
        corridor(args.seeds, args.steps)
