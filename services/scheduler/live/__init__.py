"""The scheduler's live state, in memory and without the network: the frames being collected, the
edge registry, the plans awaiting a report, each edge's measured occupancy, the policy guard, and
the core over them (plan requests → frames → plans; reports → calibration). Threads and asyncio,
never torch or grpc (the servicer converts messages); saving it to a file is ../state.py's job."""
