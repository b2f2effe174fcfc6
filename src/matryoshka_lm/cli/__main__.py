from matryoshka_lm.cli.main import main

raise SystemExit(main())
