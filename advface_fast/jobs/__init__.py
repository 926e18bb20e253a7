"""Gallery re-attack jobs: every gallery image defended once (attack-as-defense), sharded,
resumable, on one process, torchrun ranks or Ray tasks; and the query side that matches against
the defended gallery.

One concern per file: ``sources`` (what images), ``sharding`` (which shard, which worker),
``shard_store`` (the on-disk format), ``worker`` (model + D + aligner), ``prefetch`` (decode ahead),
``job`` (plan, run shards, summary), ``executors`` (local / torchrun / ray), ``match`` (queries).
"""

from .executors import run, run_local, run_ray, run_torchrun
from .job import GalleryJob
from .match import match, search
from .shard_store import ConfigChanged, GalleryStore
from .worker import GalleryConfig, ShardWorker

__all__ = ["ConfigChanged", "GalleryConfig", "GalleryJob", "GalleryStore", "ShardWorker", "match", "run",
           "run_local", "run_ray", "run_torchrun", "search"]
