"""Two versions of one model under one public name: a weighted split or a shadow copy, and rollback.

    policy.py     what the operator asked for at start: [canary.NAME] tables, --canary flags
    split.py      which version a request gets: a sticky hash of its key and conversation (or `user`)
    window.py     each version's recent outcomes (errors, latency) and the verdict that rolls back
    control.py    the live state per name: weight, mode, rollback (admin, automatic), metrics, log
    controller.py the admin API: GET/PUT /v1/admin/models/{name}/canary, POST .../rollback
    admin.py      the one function that says who may call the admin API

The version is chosen once, when a request is resolved; the request keeps that version's model to its
end, so a weight change or a rollback moves the requests that come after it, never one in flight.
"""
