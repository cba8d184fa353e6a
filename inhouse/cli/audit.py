"""`inhouse audit ...`: verify the log, list and show records."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from inhouse.cli.common import cli_errors, err, out

audit_app = typer.Typer(help="The tamper-evident audit log.", no_args_is_help=True)

DbOpt = Annotated[str | None, typer.Option("--database-url", help="SQLAlchemy URL of the audit "
                                           "database (default: the SQLite file in the cache).")]
KeyOpt = Annotated[Path | None, typer.Option("--audit-signing-key", "--key",
                                             help="Ed25519 signing key file (default: "
                                             "audit-signing.key in the cache).")]


def _open(database_url: str | None, key: Path | None):
    from inhouse.errors import InhouseError
    from inhouse.governance.audit_log import (AuditLog, default_key_path, default_url,
                                              load_signing_key)

    url = database_url or default_url()
    if url.startswith("sqlite:///") and not Path(url.removeprefix("sqlite:///")).is_file():
        raise InhouseError(f"no audit database at {url}")
    key_path = key or default_key_path()
    if not key_path.is_file():
        raise InhouseError(f"no signing key at {key_path}; pass --key")
    return AuditLog(url, load_signing_key(key_path)), load_signing_key(key_path).public_key()


def _personal_data(database_url: str | None, key: Path | None):
    """Every store of personal data `serve` writes with the same --database-url: the audit
    log, the stored responses and the web UI's conversations (by default the cache's audit.db
    and server.db)."""
    from inhouse.config import cache_root
    from inhouse.governance.conversations_store import ConversationStore
    from inhouse.governance.privacy import PersonalData
    from inhouse.governance.responses_store import ResponseStore, default_url

    log, _ = _open(database_url, key)
    url = database_url or default_url(cache_root())
    return PersonalData(log, ResponseStore(url), ConversationStore(url))


def _open_for_reading(database_url: str | None):
    """The log alone, for verification with a pinned key: no private key is needed or read."""
    from inhouse.errors import InhouseError
    from inhouse.governance.audit_log import AuditLog, default_url

    url = database_url or default_url()
    if url.startswith("sqlite:///") and not Path(url.removeprefix("sqlite:///")).is_file():
        raise InhouseError(f"no audit database at {url}")
    return AuditLog(url)


@audit_app.command("public-key")
@cli_errors
def public_key(key: KeyOpt = None) -> None:
    """Print the log's public key (PEM), for the auditor to pin with `verify --public-key`."""
    from inhouse.errors import InhouseError
    from inhouse.governance.audit_log import default_key_path, load_signing_key, public_key_pem

    key_path = key or default_key_path()
    if not key_path.is_file():
        raise InhouseError(f"no signing key at {key_path}; pass --audit-signing-key")
    out.print(public_key_pem(load_signing_key(key_path).public_key()).decode().strip(),
              markup=False, highlight=False)


@audit_app.command()
@cli_errors
def verify(database_url: DbOpt = None, key: KeyOpt = None,
           public_key_file: Annotated[Path | None, typer.Option(
               "--public-key", help="The log's public key (PEM, from `audit public-key`): trust "
                                    "it alone. Without it the key is derived from the private "
                                    "key file, which anyone who can replace that file defeats.")] = None,
           witness: Annotated[Path | None, typer.Option(
               help="A witness file of checkpoints (serve --audit-witness): catches rollback, "
                    "truncation, forks and deleted checkpoints.")] = None) -> None:
    """Check every record, column, content row, checkpoint and witnessed checkpoint.

    Names the first bad record; exits 3 if anything fails."""
    from inhouse.governance.audit_log import load_public_key
    from inhouse.governance.witness import read_witness

    if public_key_file is not None:
        log, public = _open_for_reading(database_url), load_public_key(public_key_file)
    else:
        log, public = _open(database_url, key)
        err.print("[yellow]warning: the public key is derived from the private key file; pin it "
                  "with --public-key (see `inhouse audit public-key`)[/yellow]")
    witnessed = read_witness(witness) if witness is not None else None
    report = log.verify(public, witnessed)
    if report.ok:
        out.print(f"[green]ok[/green]: {report.num_records} records, {report.num_checkpoints} signed "
                  f"checkpoints, {report.unsealed} records after the last checkpoint (not yet "
                  f"sealed)" + (f", {report.num_witnessed} witnessed checkpoints agree"
                                if witnessed is not None else "")
                  + (f"; {report.legacy_content} content rows predate commitments and cannot be "
                     "verified" if report.legacy_content else ""))
        return
    out.print(f"[red]TAMPERED[/red]: first bad record {report.first_bad_index}: {report.problem}")
    raise typer.Exit(3)


def _detail(r: dict) -> str:
    """What a leaf says in one line: the endpoint, the outcome, the tool call or the verdict."""
    if r["kind"] == "tool":
        return f"{r.get('recipient')} {r.get('status')}"
    if r["kind"] == "policy":
        return f"{r.get('stage')}: {r.get('action')} {r.get('category') or ''}".strip()
    return r.get("endpoint") or f"{r.get('finish_reason')} {r.get('completion_tokens', '')}"


@audit_app.command("list")
@cli_errors
def list_records(database_url: DbOpt = None, key: KeyOpt = None,
                 subject: Annotated[str | None, typer.Option(help="Only this subject id.")] = None,
                 since: Annotated[float | None, typer.Option(help="Only records from the last N hours.")] = None,
                 limit: Annotated[int, typer.Option(min=1, help="At most this many.")] = 50) -> None:
    """List records (newest last): index, time, record id, kind, subject, endpoint or outcome."""
    log, _ = _open(database_url, key)
    cutoff = time.time() - since * 3600 if since is not None else None
    t = Table("index", "time", "record", "kind", "subject", "detail", "verified")
    for r in log.list(subject, cutoff, limit):
        detail = _detail(r)
        created = r.get("created_at")
        t.add_row(str(r["index"]), time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(created))
                  if isinstance(created, (int, float)) else "?",
                  r["record_id"], r["kind"], r.get("subject") or "", str(detail),
                  "yes" if r["verified"] else f"[red]NO: {r['problem']}[/red]")
    out.print(t)


@audit_app.command()
@cli_errors
def show(record_id: Annotated[str, typer.Argument(help="The record id (a request id).")],
         database_url: DbOpt = None, key: KeyOpt = None) -> None:
    """Print a record's leaves (and its content, if kept) as JSON."""
    from inhouse.errors import InhouseError

    log, _ = _open(database_url, key)
    leaves = log.get(record_id)
    if not leaves:
        raise InhouseError(f"no audit record {record_id}")
    out.print_json(json.dumps(leaves, ensure_ascii=False))


@audit_app.command()
@cli_errors
def replay(record_id: Annotated[str, typer.Argument(help="The record id to replay.")],
           model: Annotated[Path, typer.Option(help="The checkpoint the record was produced by.")],
           adapter: Annotated[Path | None, typer.Option(help="The LoRA adapter directory the "
                                                        "record used, if any.")] = None,
           database_url: DbOpt = None, key: KeyOpt = None,
           device: Annotated[str, typer.Option(help="cpu, or cuda[:N] for a record the cuda "
                                               "backend produced.")] = "cpu") -> None:
    """Re-run a logged request (prompt ids, params, seed) in reproducible mode and report whether
    the output ids are bit-identical. Refuses if the model's digest differs from the record's."""
    from inhouse.kernels.backend import device_and_backend
    from inhouse.replay import replay as run_replay

    device_and_backend(device)  # before anything is opened: a device this machine lacks first
    log, _ = _open(database_url, key)
    r = run_replay(log, record_id, model, adapter, device=device)
    if r.identical:
        out.print(f"[green]identical[/green]: {r.num_replayed} output tokens reproduced bit for bit")
        return
    out.print(f"[red]DIFFERENT[/red]: first difference at output token {r.first_difference} "
              f"({r.num_logged} logged, {r.num_replayed} replayed)")
    raise typer.Exit(3)


@audit_app.command()
@cli_errors
def export(subject: Annotated[str, typer.Option(help="The subject id (the request's user or "
                                                "X-Subject-Id).")],
           database_url: DbOpt = None, key: KeyOpt = None) -> None:
    """Everything held about a person, as JSON (access requests: PIPEDA 4.9, GDPR 15)."""
    data = _personal_data(database_url, key)
    out.print_json(json.dumps(data.export(subject), ensure_ascii=False))


@audit_app.command()
@cli_errors
def erase(subject: Annotated[str | None, typer.Option(help="Erase this subject's content.")] = None,
          older_than_days: Annotated[float | None, typer.Option(help="Erase content older than "
                                                                "this many days.")] = None,
          database_url: DbOpt = None, key: KeyOpt = None) -> None:
    """Delete a person's prompts, answers, stored responses and web UI conversations; logged,
    `verify` still passes."""
    from inhouse.errors import InhouseError

    if subject is None and older_than_days is None:
        raise InhouseError("say what to erase: --subject S and/or --older-than-days N")
    data = _personal_data(database_url, key)
    before = time.time() - older_than_days * 86400 if older_than_days is not None else None
    done = data.erase(subject, before, "request" if subject else "retention")
    out.print(f"erased the content of {done.audit_records} audit record(s) and "
              f"{done.stored_responses} stored response(s) and {done.conversations} "
              "conversation(s); the erasure is recorded in the log")


@audit_app.command()
@cli_errors
def prove(record_id: Annotated[str, typer.Argument(help="The record id.")],
          out_file: Annotated[Path, typer.Option("--out", help="Where to write the proof (JSON).")],
          with_content: Annotated[bool, typer.Option(
              help="Include the record's content (and its salts): the proof then also proves "
                   "the prompt and answer text. Personal data: hand it only to who may see it.")] = False,
          database_url: DbOpt = None) -> None:
    """Write a proof a third party checks offline.

    The proof holds the record's leaves, their inclusion proofs and the signed checkpoint that
    contains them."""
    from inhouse.governance.audit_proof import make_proof

    proof = make_proof(_open_for_reading(database_url), record_id, with_content)
    out_file.write_text(json.dumps(proof, indent=1, ensure_ascii=False))
    cp = proof["checkpoint"]
    out.print(f"wrote {out_file}: {len(proof['leaves'])} leaves of {record_id} in the tree of "
              f"size {cp['tree_size']} signed by key {cp['key_id']}")


@audit_app.command("check-proof")
@cli_errors
def check_proof_cmd(proof_file: Annotated[Path, typer.Argument(help="The proof (JSON).")],
                    public_key_file: Annotated[Path, typer.Option(
                        "--public-key", help="The log's public key (PEM) you pinned.")]) -> None:
    """Check a proof with no database: signatures, inclusion, content commitments."""
    from inhouse.errors import InhouseError
    from inhouse.governance.audit_log import load_public_key
    from inhouse.governance.audit_proof import ProofError, check_proof

    try:
        proof = json.loads(proof_file.read_text())
    except (OSError, ValueError) as e:
        raise InhouseError(f"cannot read the proof {proof_file}: {e}") from None
    try:
        r = check_proof(proof, load_public_key(public_key_file))
    except ProofError as e:
        out.print(f"[red]INVALID[/red]: {e}")
        raise typer.Exit(3) from None
    signed = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(r.signed_at))
    out.print(f"[green]valid[/green]: record {r.record_id} is in the log (tree of size "
              f"{r.tree_size}, signed {signed} by key {r.key_id})")
    for rec in r.records:
        made = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(rec["created_at"]))
        what = {k: rec[k] for k in ("model", "model_digest", "adapter_digest", "params", "endpoint",
                                    "finish_reason", "completion_tokens", "output_ids_sha256")
                if rec.get(k) is not None}
        out.print(f"  leaf {rec['index']} ({rec['kind']}, {made}"
                  f"{', content proven' if rec['index'] in r.content_proven else ''}): "
                  f"{json.dumps(what)}", markup=False, highlight=False)


@audit_app.command("rotate-key")
@cli_errors
def rotate_key(new_key: Annotated[Path, typer.Option(
                   help="The next signing key file (created, mode 0600, if missing).")],
               database_url: DbOpt = None, key: KeyOpt = None) -> None:
    """Rotate the checkpoint signing key (stop the server first).

    A signed leaf names the next key and a checkpoint of the current key seals it; restart the
    server with --audit-signing-key NEW_KEY. Auditors keep their pinned key: verify follows the
    rotation."""
    from inhouse.governance.audit_log import load_signing_key, public_key_pem
    from inhouse.governance.audit_verify import key_id

    log, _ = _open(database_url, key)
    old = key_id(log.key.public_key())
    nxt = load_signing_key(new_key)
    log.rotate_key(nxt)
    out.print(f"rotated from key {old} to key {key_id(nxt.public_key())}; its public key:")
    out.print(public_key_pem(nxt.public_key()).decode().strip(), markup=False, highlight=False)
