"""`trajdata inspect`, `verify`, `show`, `index`, `recode`, `stats`: datasets on disk."""
from __future__ import annotations

import json

import click

from trajdata.format.codec import DEFAULT_PROFILE, PROFILES


@click.command()
@click.argument("dataset", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def inspect(dataset, as_json):
    """Episodes, steps, bytes/step overall and per field, score/length summary."""
    from trajdata.format.inspect import summarize

    s = summarize(dataset)
    for w in s["warnings"]:
        click.echo(f"trajdata: warning: {w}", err=True)
    if as_json:
        click.echo(json.dumps(s, indent=2))
        return
    click.echo(f"{s['dataset']}: schema {s['schema']}, expert {s['expert'].get('name')} {s['expert'].get('version')}")
    click.echo(f"  shards {s['shards']}  episodes {s['episodes']}  steps {s['steps']:,}  "
               f"bytes {s['bytes']:,}  status {s['status']}")
    if s["steps"]:
        click.echo(f"  bytes/step {s['bytes_per_step']:.2f} (raw {s['raw_bytes_per_step']:,}, "
                   f"x{s['raw_bytes_per_step'] / s['bytes_per_step']:.0f} smaller)")
        for k, v in sorted(s["field_bytes_per_step"].items(), key=lambda kv: -kv[1]):
            click.echo(f"    {k:<14}{v:8.3f}")
    for key in ("episode_steps", "score", "return"):
        d = s.get(key)
        if d:
            click.echo(f"  {key:<14} mean {d['mean']:.1f}  median {d['median']:.1f}  min {d['min']:.0f}  max {d['max']:.0f}")


@click.command()
@click.argument("dataset", type=click.Path())
@click.option("--quarantine", is_flag=True,
              help="Move bad shards into DATASET/quarantine/ and rebuild the index from the rest, so the dataset is "
                   "usable again; says how many episodes were lost.")
def verify(dataset, quarantine):
    """Decode every chunk, check every checksum, and cross-check the index.

    Reports every problem on stdout (one line each, naming shard, episode, chunk and field) and exits
    non-zero with a count (one error line on stderr); with --quarantine, exits 0 once what is left
    verifies."""
    import sys

    from tqdm import tqdm

    from trajdata.errors import DataError
    from trajdata.format.inspect import check, problem_summary, quarantine as move_aside

    keys = ("dataset", "shards", "episodes", "chunks", "steps", "ok")
    r = check(dataset, progress=True, on_problem=lambda line: tqdm.write(f"problem: {line}", file=sys.stdout))
    if not r["problems"]:
        click.echo(json.dumps({k: r[k] for k in keys}))
        return
    if not quarantine:
        raise DataError(problem_summary(r))
    q = move_aside(dataset, r)
    again = check(dataset)
    if again["problems"]:
        raise DataError(f"after moving {len(q['quarantined'])} shard(s) aside: {problem_summary(again)}")
    gone = q["quarantined"] + [f"{m} (missing)" for m in q["missing_shards"]]
    click.echo(f"quarantined {len(q['quarantined'])} shard(s) into {q['quarantine_dir']}: {', '.join(gone) or 'none'}; "
               f"{q['episodes_lost']} episode(s) lost ({q['steps_lost_per_old_index']:,} steps per the old index); "
               f"index rebuilt: {q['episodes_left']} episodes left", err=True)
    click.echo(json.dumps({k: again[k] for k in keys}))


@click.command()
@click.argument("dataset", type=click.Path())
def index(dataset):
    """Rebuild index.parquet from the shards alone."""
    from trajdata.format.dataset import build_index

    t = build_index(dataset, progress=True)
    click.echo(f"{dataset}: index of {t.num_rows} episodes written")


@click.command()
@click.argument("dataset", type=click.Path())
@click.option("--episode", required=True, help="Episode id (see index.parquet / inspect).")
@click.option("--step", default=0, show_default=True, type=int, help="Step of the episode to render (0 = its first).")
@click.option("--no-color", is_flag=True, help="Plain text: no ANSI colours or reverse-video cursor.")
def show(dataset, episode, step, no_color):
    """Render one step's screen (NetHack tty in colour, or the Atari frame) in the terminal."""
    from trajdata.format.inspect import render_atari, render_tty, step_frame

    f = step_frame(dataset, episode, step)
    if "tty_chars" in f:
        click.echo(render_tty(f["tty_chars"], f["tty_colors"], f["tty_cursor"], color=not no_color))
    else:
        click.echo(render_atari(f["frame"]))
    click.echo(f"episode {episode} step {step}: action {int(f['action'])} reward {float(f['reward']):g} done {bool(f['done'])}")


@click.command()
@click.argument("dataset", type=click.Path())
@click.option("--out", required=True, type=click.Path(file_okay=False), help="New dataset directory (created, or resumed).")
@click.option("--codec", default=DEFAULT_PROFILE, show_default=True, type=click.Choice(sorted(PROFILES)),
              help="Storage profile to re-encode every chunk with.")
def recode(dataset, out, codec):
    """Copy DATASET to --out with every chunk re-encoded in another storage profile.

    E.g. a `stream` dataset from an older trajdata into `stream2` (smaller), or `compact` into either,
    which the loader decodes straight into batches. Every new chunk is checked against the original;
    rerunning resumes.
    """
    from trajdata.format.dataset import recode as run

    click.echo(json.dumps(run(dataset, out, codec, progress=True)))


@click.command()
@click.argument("dataset", type=click.Path())
@click.option("--png", default=None, type=click.Path(dir_okay=False),
              help="Histogram image to write (default: DATASET/stats.png).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
def stats(dataset, png, as_json):
    """Score, turn, depth and death-cause distributions of a NetHack dataset (compare with NLD-AA)."""
    from trajdata.format.stats import dataset_stats, format_stats, plot_stats

    s = dataset_stats(dataset)
    s["png"] = str(plot_stats(dataset, png))
    click.echo(json.dumps(s, indent=2) if as_json else format_stats(s))
