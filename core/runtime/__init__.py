"""Process runtime: the worker spec, exit codes named once, the blocking-worker loop.
Imports core.base, core.http, core.messaging."""
