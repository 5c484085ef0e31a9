"""The process: lifecycle (start, reload, drain, stop), the command line, and the demo servers.

Only this package may import from every other one; nothing outside it imports from here.
"""
