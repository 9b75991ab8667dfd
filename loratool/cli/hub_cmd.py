"""`loratool push` and `loratool pull`."""

from __future__ import annotations

import click

from ..units import format_bytes
from .params import allow_pickle_option, force_option, json_option, output_option


@click.command("push")
@click.argument("adapter", type=click.Path())
@click.argument("repo_id")
@click.option("--private", is_flag=True, help="Create the repo private (an existing repo keeps its visibility).")
@click.option("--revision", default=None, help="Branch to push to; created from main when missing.")
@click.option("--create-pr", is_flag=True, help="Open a pull request instead of committing directly.")
@click.option("--message", default=None, help="Commit message.")
@click.option("--token-env", default=None, metavar="NAME",
              help="Read the token from this environment variable (default: HF_TOKEN, then `hf auth login`).")
@click.option("--dry-run", is_flag=True, help="Show the files, sizes and model card; touch no network.")
@click.option("--include-merged", type=click.Path(), default=None, metavar="MODEL_DIR",
              help="Also merge the adapter into MODEL_DIR and upload the merged model under merged/.")
@click.option("--card-overwrite", is_flag=True, help="Replace the folder's own README.md with a generated card.")
@click.option("--keep-original", is_flag=True, help="When converting to PEFT, upload the original file under original/.")
@click.option("--base-model", default=None, metavar="REPO_ID", help="Hub id of the base model, for the card.")
@allow_pickle_option
@json_option
@click.pass_obj
def push_cmd(out, adapter, repo_id, private, revision, create_pr, message, token_env, dry_run, include_merged,
             card_overwrite, keep_original, base_model, allow_pickle, as_json):
    """Validate ADAPTER and upload it to REPO_ID on the Hugging Face Hub, with a model card.

    The adapter must parse, hold only finite values and have a consistent config; kohya, diffusers,
    loralib and pickle adapters are converted to PEFT safetensors first (a pickle is never uploaded).
    The token is never printed or written anywhere.

    \b
    Examples:
      loratool push adapter/ me/my-lora --dry-run
      loratool push adapter/ me/my-lora --private
      loratool push adapter/ org/their-lora --create-pr --message "rank 16 retrain"
    """
    from ..api.hub import push

    result = push(adapter, repo_id, private=private, revision=revision, create_pr=create_pr, message=message,
                  token_env=token_env, dry_run=dry_run, include_merged=include_merged,
                  card_overwrite=card_overwrite, keep_original=keep_original, base_model=base_model,
                  allow_pickle=allow_pickle)
    if out.notes_then_json(result, as_json):
        return
    for name, size in result.files.items():
        out.print(f"  {name}  {format_bytes(size)}")
    if result.dry_run:
        out.print("[yellow]dry run[/]: nothing was uploaded. The model card:\n")
        out.stdout.print(result.card, markup=False, highlight=False)
        return
    out.print(f"[green]pushed[/] to {result.pr_url or result.commit_url}")


@click.command("pull")
@click.argument("repo_id")
@output_option
@click.option("--revision", default=None, help="Branch, tag or commit.")
@force_option
@json_option
@click.pass_obj
def pull_cmd(out, repo_id, output, revision, force, as_json):
    """Download only the adapter files of REPO_ID into OUTPUT, and check that they load.

    \b
    Example:
      loratool pull me/my-lora -o adapter/
    """
    from ..api.hub import pull

    result = pull(repo_id, output, revision=revision, force=force)
    if as_json:
        out.json(result.to_json())
        return
    out.print(f"[green]pulled[/] {result.repo_id} ({result.modules} modules) to {result.output}: "
              f"{', '.join(result.files)}")
