"""Options shared by several commands, and what they build from the resolved settings
(encoders, searcher, filters)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from ..settings import Settings

if TYPE_CHECKING:  # the store (SQLAlchemy) and the towers (torch) load when a command needs them
    from retrieval.filters import Filters
    from retrieval.model import Checkpoint, TextEncoder, VisionEncoder
    from retrieval.privacy import KeyFiles
    from retrieval.search import Searcher
    from retrieval.store import Store

JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout.")]
StoreOpt = Annotated[Optional[Path], typer.Option("--store", "-s", help="Store directory.")]
DbOpt = Annotated[Optional[str], typer.Option(
    "--db", help="Keep the rows in PostgreSQL: postgresql+psycopg://USER@HOST[:PORT]/DB "
                 "(default: SQLite in the store folder; a new folder adopts the database's store).")]
ModelOpt = Annotated[Optional[str], typer.Option(
    "--model", "-m", help="Hub id or local checkpoint folder (default: MedSigLIP-448).")]
DeviceOpt = Annotated[Optional[str], typer.Option("--device", help="auto, cpu, cuda or cuda:N.")]
PrecisionOpt = Annotated[Optional[str], typer.Option(
    "--precision", help="auto (bf16 on GPU, fp32 on CPU), fp32, bf16, or int8 (CPU: ~1.8× faster).")]
KOpt = Annotated[Optional[int], typer.Option("-k", "--top-k", min=1, help="Number of results.")]
MinScoreOpt = Annotated[Optional[float], typer.Option(
    "--min-score", help="Drop results whose cosine score is below this.")]
ModalityOpt = Annotated[Optional[list[str]], typer.Option(
    "--modality", help="Only these DICOM modalities (repeatable), e.g. CR, CT.")]
BodyPartOpt = Annotated[Optional[list[str]], typer.Option(
    "--body-part", help="Only these BodyPartExamined values (repeatable).")]
DateFromOpt = Annotated[Optional[str], typer.Option("--date-from", help="Study date ≥ (YYYY-MM-DD).")]
DateToOpt = Annotated[Optional[str], typer.Option("--date-to", help="Study date ≤ (YYYY-MM-DD).")]
PathGlobOpt = Annotated[Optional[str], typer.Option(
    "--path-glob", help="Only paths matching this glob, e.g. '*/derm/*'.")]
# How a PACS is reached (index dicomweb+…/dimse://, receive); secrets only from the
# environment or the settings file, never the command line (other users see it in ps)
CallingAetOpt = Annotated[Optional[str], typer.Option(
    "--calling-aet", help="DIMSE: our AE title, as the PACS knows us (default MEDSEARCH).")]
PacsUserOpt = Annotated[Optional[str], typer.Option(
    "--pacs-user", help="DICOMweb: HTTP basic user (password: MEDSEARCH_PACS_PASSWORD; "
                        "a bearer token: MEDSEARCH_PACS_TOKEN).")]
TlsOpt = Annotated[Optional[bool], typer.Option("--tls/--no-tls", help="DIMSE over TLS.")]
TlsCaOpt = Annotated[Optional[Path], typer.Option(
    "--tls-ca", help="CA bundle that signed the PACS's certificate (https and DIMSE TLS).")]
TlsCertOpt = Annotated[Optional[Path], typer.Option(
    "--tls-cert", help="Our TLS certificate (PEM): mutual TLS, or receive's server certificate.")]
TlsKeyOpt = Annotated[Optional[Path], typer.Option("--tls-key", help="The key of --tls-cert (PEM).")]
PacsTimeoutOpt = Annotated[Optional[float], typer.Option(
    "--pacs-timeout", min=0.1, help="Seconds for one network step with the PACS (default 30).")]
LabelOpt = Annotated[Optional[list[str]], typer.Option(
    "--label", help="Only images carrying this label (repeatable: any of them).")]


def resolve(**flags) -> Settings:
    """The run's settings, with the command line's flags (None: not given) over the rest."""
    return Settings.resolve(**{k: str(v) if isinstance(v, Path) else v for k, v in flags.items()})


def build_filters(modality=None, body_part=None, date_from=None, date_to=None, path_glob=None,
                  label=None) -> Filters:
    from retrieval.filters import Filters

    return Filters(modality=list(modality or []), body_part=list(body_part or []),
                   date_from=date_from, date_to=date_to, path_glob=path_glob,
                   label=list(label or []))


def store_root(cfg: Settings) -> Path:
    return Path(cfg.store)


def open_for_writing(cfg: Settings) -> Store:
    """The configured store, holding its writer lock; a patient-key secret still kept in its
    database moves out to the configured key files now."""
    from retrieval.privacy import migrate_legacy
    from retrieval.store import Store

    st = Store.open(store_root(cfg), exclusive=True, db=cfg.db)
    try:
        migrate_legacy(st, key_files(cfg))
    except BaseException:
        st.close()
        raise
    return st


def key_files(cfg: Settings) -> KeyFiles:
    from ..app import Medsearch

    return Medsearch.key_files(cfg)


def vision_encoder(cfg: Settings, checkpoint: Checkpoint, compile: bool = False) -> VisionEncoder:
    """The vision tower as configured (``compile`` only pays off on long runs: `index`)."""
    from retrieval.model.acceleration import configure_cpu_threads
    from retrieval.model.encoders import VisionEncoder

    configure_cpu_threads(cfg.threads)
    return VisionEncoder(checkpoint, cfg.device, cfg.precision, compile,
                         cuda_bf16=cfg.cuda_bf16, cache_dir=cfg.cache_folder)


def text_encoder(cfg: Settings, checkpoint: Checkpoint) -> TextEncoder:
    from retrieval.model.acceleration import configure_cpu_threads
    from retrieval.model.encoders import TextEncoder

    configure_cpu_threads(cfg.threads)
    return TextEncoder(checkpoint, cfg.device, cfg.precision, cache_dir=cfg.cache_folder)


def searcher(cfg: Settings, store: Store, model: str | None = None) -> Searcher:
    """The searcher the application object builds; ``model`` None: the store's checkpoint."""
    from ..app import Medsearch

    return Medsearch(store, cfg, model=model).searcher

