"""`geca experiment`: the whole GeCA study as resumable stages (config, graph, stages) and its report."""
