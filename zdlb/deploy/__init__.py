"""``zdlb deploy``: a rolling deploy driven through the control socket.

plan.py (the procedure as a table) and record.py (the deploy state the daemon keeps, and its
lock) are pure; client.py talks to the control socket, driver.py runs the procedure, progress.py
shows it, cli.py is the command line. The daemon side (lock, journal, ``show deploy``) lives in
control/commands.py over record.py.
"""
