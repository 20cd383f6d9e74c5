from xcr0run.cli import main

main()
