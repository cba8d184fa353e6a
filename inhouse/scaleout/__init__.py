"""Scale-out on Ray Serve: the engine as N replicas (Serve deployments) behind one API process.

The API process keeps the governed turn (keys, PII, the policy guard, the audit log, stores): it
sees the replicas through `RayEngineClient`, an `EngineClient` like the in-process engine. Each
replica holds a model and an `AsyncEngine`; Serve routes, autoscales on ongoing requests and
replaces a replica that dies. `ray[serve]` is an extra: nothing here is imported on one machine.
"""
