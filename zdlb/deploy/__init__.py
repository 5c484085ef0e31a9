"""``zdlb deploy``: a rolling deploy driven through the control socket.

plan.py (the procedure as a table) and record.py (the deploy state the daemon keeps, and its
lock) are pure; client.py talks to the control socket, actions.py runs the user's command and
the verify request, driver.py runs the procedure, progress.py shows it, cli.py is the command
line. The daemon side (lock, journal, ``show deploy``) is control/deploys.py over record.py.
"""
