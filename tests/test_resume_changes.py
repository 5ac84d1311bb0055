"""A resume refused because the recipe changed names the keys that changed.

The run's own recipe.toml holds every key as the run started; a key it lacks was added to
mutualkd later and takes today's default, which may not be what the run used.
"""

from __future__ import annotations

import shutil

from mutualkd.engine.state import recipe_changes


def test_recipe_changes_lists_changed_added_and_removed_keys():
    saved = {"run": {"name": "a", "seed": 0, "log_every": 10}, "optimizer": {"name": "sgd", "lr": 0.05},
             "peers": [{"model": "cifar_resnet20"}, {"model": "cifar_wrn_16_1"}], "strategy": {"name": "kl_dml", "t": 1}}
    now = {"run": {"name": "a", "seed": 0, "log_every": 50}, "optimizer": {"name": "sgd", "lr": 0.01, "momentum": 0.9},
           "peers": [{"model": "cifar_resnet20"}, {"model": "cifar_resnet20"}], "strategy": {"name": "kl_dml"}}
    assert recipe_changes(saved, now) == [
        "optimizer.lr: 0.05 then, 0.01 now",
        "optimizer.momentum: absent from the run's recipe.toml, 0.9 now (today's default)",
        "peers.1.model: 'cifar_wrn_16_1' then, 'cifar_resnet20' now",
        "strategy.t: 1 then, not a key now",
    ]  # run.log_every: a logging field, which a resume may change
    assert recipe_changes(saved, saved) == []
    many = {"optimizer": {f"k{i}": i for i in range(9)}}
    listed = recipe_changes({}, many, limit=4)
    assert len(listed) == 5 and listed[-1] == "... and 5 more"


def test_resume_of_a_run_whose_recipe_lacks_a_key_names_it_and_the_fix(tiny_run, tmp_path, run_cli, set_options,
                                                                         folder_snapshot):
    run = shutil.copytree(tiny_run, tmp_path / "run")
    (run / "summary.json").unlink()
    recipe = run / "recipe.toml"
    lines = recipe.read_text(encoding="utf-8").splitlines(keepends=True)
    assert "lr = 0.05\n" in lines  # the tiny run's learning rate; the default is another
    recipe.write_text("".join(line for line in lines if line != "lr = 0.05\n"), encoding="utf-8")
    before = folder_snapshot(run)

    res = run_cli(["run", "--resume", str(run)])
    assert res.returncode == 2, res.stderr
    err = " ".join(res.stderr.split())
    assert "the recipe differs from the one this run was started with" in err
    assert "optimizer.lr: absent from the run's recipe.toml" in err and "--set optimizer.lr=..." in err
    assert "Traceback" not in res.stderr and folder_snapshot(run) == before  # nothing written, nothing lost

    res = run_cli(["run", "--resume", str(run), *set_options("optimizer.lr=0.05")])
    assert res.returncode == 0, res.stderr
    assert (run / "summary.json").is_file()


def test_resume_with_a_changed_value_names_the_key_then_and_now(tiny_run, tmp_path, run_cli, set_options):
    run = shutil.copytree(tiny_run, tmp_path / "run")
    (run / "summary.json").unlink()
    res = run_cli(["run", "--resume", str(run), *set_options("optimizer.lr=0.01")])
    assert res.returncode == 2, res.stderr
    err = " ".join(res.stderr.split())
    assert "optimizer.lr: 0.05 then, 0.01 now" in err and "mutualkd run --resume RUN_DIR" in err
