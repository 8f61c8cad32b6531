"""`distil tracking-user`: accounts on a team's MLflow server (launch/mlflow_server.sh --team, MLflow's
basic-auth app), managed by an admin.

The admin's credentials come the way every MLflow client takes them: MLFLOW_TRACKING_USERNAME and
MLFLOW_TRACKING_PASSWORD, or ~/.mlflow/credentials. A new user's password comes from a file or a hidden
prompt, never from the command line, and nothing here prints a password.
"""

from __future__ import annotations

import os
from pathlib import Path

import click

from distil.common.errors import UserError

PERMISSIONS = ("READ", "EDIT", "MANAGE", "NO_PERMISSIONS")


def _uri(tracking_uri: str | None) -> str:
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri or not uri.startswith(("http://", "https://")):
        raise UserError("the team server's address is needed: --tracking-uri http://HOST:PORT or MLFLOW_TRACKING_URI")
    return uri


def _password(path: str | None, name: str) -> str:
    if path is None:
        return click.prompt(f"password for {name}", hide_input=True, confirmation_prompt=True)
    try:
        text = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"--password-file {path} cannot be read ({e.__class__.__name__})") from None
    if not text or not text[0]:
        raise UserError(f"--password-file {path} is empty: its first line is the password")
    return text[0]


def _call(uri: str, what: str, fn, *args):
    """Runs one request of the auth client; its refusals become one line naming what to change."""
    from mlflow.exceptions import MlflowException

    try:
        return fn(*args)
    except MlflowException as e:
        from distil.pretrain.tracking.transport import refusal_status

        code, status, text = getattr(e, "error_code", ""), refusal_status(e), str(e)
        if status == "401":
            raise UserError(f"{uri} refused the admin's credentials while trying to {what}: set "
                            "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or ~/.mlflow/credentials) "
                            "to an admin's") from None
        if status == "403":
            raise UserError(f"{uri}: {os.environ.get('MLFLOW_TRACKING_USERNAME', 'this user')} may not {what} "
                            "(an admin's credentials are needed)") from None
        if code == "RESOURCE_ALREADY_EXISTS":
            raise UserError(f"{uri}: cannot {what}: it already exists") from None
        if code == "RESOURCE_DOES_NOT_EXIST":
            raise UserError(f"{uri}: cannot {what}: no such user") from None
        first = text.strip().splitlines()[0][:200] if text.strip() else type(e).__name__
        raise UserError(f"{uri}: could not {what} ({first})") from None
    except OSError as e:
        raise UserError(f"cannot reach {uri} to {what} ({e.__class__.__name__}): is the server running?") from None


def _client(uri: str):
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # a wrong address fails now, not in minutes
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    from mlflow.server import get_app_client

    return get_app_client("basic-auth", tracking_uri=uri)


def _grant(uri: str, client, name: str, experiment: str, permission: str) -> None:
    import mlflow

    found = _call(uri, f"look up experiment {experiment!r}",
                  mlflow.MlflowClient(tracking_uri=uri).get_experiment_by_name, experiment)
    if found is None:
        raise UserError(f"{uri} has no experiment {experiment!r}: check --experiment (a run of it creates it)")
    _call(uri, f"give {name} {permission} on experiment {experiment!r}", client.grant_user_permission, name,
          "experiment", found.experiment_id, permission)


uri_option = click.option("--tracking-uri", default=None, help="The team server (default: MLFLOW_TRACKING_URI).")
permission_option = click.option("--permission", type=click.Choice(PERMISSIONS), default="EDIT", show_default=True,
                                 help="What the user may do in --experiment.")


@click.group("tracking-user", context_settings={"help_option_names": ["-h", "--help"]})
def tracking_user() -> None:
    """Accounts on a team's MLflow server (launch/mlflow_server.sh --team), run by an admin whose credentials
    are in MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD or ~/.mlflow/credentials.

    Without a grant, a user may do in others' experiments what the server's --default-permission allows
    (READ unless set otherwise) and manages the experiments they create."""


@tracking_user.command("add")
@click.argument("name")
@click.option("--password-file", type=click.Path(dir_okay=False), default=None,
              help="A file whose first line is the new user's password (default: asked, hidden).")
@click.option("--admin", is_flag=True, help="Make the user an admin too.")
@click.option("--experiment", default=None, help="Also grant --permission on this experiment.")
@permission_option
@uri_option
def add(name: str, password_file: str | None, admin: bool, experiment: str | None, permission: str,
        tracking_uri: str | None) -> None:
    """Create user NAME."""
    uri = _uri(tracking_uri)
    password = _password(password_file, name)
    client = _client(uri)
    _call(uri, f"create user {name!r}", client.create_user, name, password)
    if admin:
        _call(uri, f"make {name} an admin", client.update_user_admin, name, True)
    if experiment is not None:
        _grant(uri, client, name, experiment, permission)
    click.echo(f"user {name} created at {uri}" + (" (admin)" if admin else "")
               + (f"; {permission} on experiment {experiment!r}" if experiment else ""))


@tracking_user.command("grant")
@click.argument("name")
@click.option("--experiment", required=True, help="The experiment, by name.")
@permission_option
@uri_option
def grant(name: str, experiment: str, permission: str, tracking_uri: str | None) -> None:
    """Give user NAME a permission on one experiment."""
    uri = _uri(tracking_uri)
    _grant(uri, _client(uri), name, experiment, permission)
    click.echo(f"{name}: {permission} on experiment {experiment!r} at {uri}")


@tracking_user.command("remove")
@click.argument("name")
@uri_option
def remove(name: str, tracking_uri: str | None) -> None:
    """Delete user NAME (their runs stay)."""
    uri = _uri(tracking_uri)
    _call(uri, f"delete user {name!r}", _client(uri).delete_user, name)
    click.echo(f"user {name} deleted at {uri}")

